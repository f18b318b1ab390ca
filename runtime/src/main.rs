//! thinbox: Docker-style images and containers on a thin pool. The verbs arrive with issue 5;
//! until then the binary says so instead of pretending.

fn main() -> std::process::ExitCode {
    eprintln!("thinbox: no verbs yet; the runtime is being built (see README.md)");
    std::process::ExitCode::from(2)
}
