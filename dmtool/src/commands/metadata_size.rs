//! `metadata-size`: thin_metadata_size: the metadata a pool needs for a pool size, a data
//! block size and a number of thins, with thin_metadata_size 0.9.0's options, figures and
//! output.
//!
//! The options are read the way thin_metadata_size's getopt reads them, in order, because
//! the order shows in the output: a size given without a unit is described in the output
//! unit chosen so far (`-u m -b 128` prints `--block-size=128mebibytes`, though 128 is
//! sectors). The estimate itself is `engine::tools::metadata_size`.
//!
//! Deliberate differences: bad input exits 2 (usage), not 1; a size or unit whose bytes do
//! not fit 64 bits (e.g. the zebi- and yobi- units, `-b 1z`) is refused instead of wrapping
//! around; `-h` prints this tool's own help.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::process::ExitCode;

use engine::tools::metadata_size::estimate_sectors;

use crate::output;

#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// thin_metadata_size's options (see -h)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..,
        value_name = "OPTIONS"
    )]
    pub args: Vec<OsString>,
}

/// Unit letters (lower case binary, upper case decimal) and names, in thin_metadata_size's
/// order: a name may be abbreviated to any prefix, the first match wins.
const UNIT_CHARS: &str = "bskKmMgGtTpPeEzZyY";
const UNIT_NAMES: [&str; 18] = [
    "bytes",
    "sectors",
    "kibibytes",
    "kilobytes",
    "mebibytes",
    "megabytes",
    "gibibytes",
    "gigabytes",
    "tebibytes",
    "terabytes",
    "pebibytes",
    "petabytes",
    "ebibytes",
    "exabytes",
    "zebibytes",
    "zetabytes",
    "yobibytes",
    "yottabytes",
];
const SECTORS: usize = 1;

/// Bytes per unit; `None` past 64 bits (zebi and up).
fn unit_bytes(unit: usize) -> Option<u64> {
    match unit {
        0 => Some(1),
        1 => Some(512),
        _ => {
            let (base, power) = if unit.is_multiple_of(2) {
                (1024u64, unit / 2)
            } else {
                (1000u64, unit / 2)
            };
            base.checked_pow(power as u32)
        }
    }
}

/// A unit by letter or by (a prefix of) its name.
fn unit_index(text: &str) -> Option<usize> {
    if text.len() == 1 {
        return UNIT_CHARS.find(text);
    }
    UNIT_NAMES.iter().position(|n| n.starts_with(text))
}

fn help(prg: &str) -> String {
    format!(
        "Estimates the metadata device size a thin pool needs (thin_metadata_size 0.9.0's \
         figure).\n\
         Usage: {prg} -b BLOCKSIZE -s POOLSIZE -m MAXTHINS [-u UNIT] [-n[short|long]]\n\
         \x20 -b, --block-size SIZE      data block size (a power of two sectors)\n\
         \x20 -s, --pool-size SIZE       size of the pool's data device\n\
         \x20 -m, --max-thins N          thin devices and snapshots, all together\n\
         \x20 -u, --unit UNIT            unit of the result [default: sectors]\n\
         \x20 -n, --numeric-only[=short|long]\n\
         \x20                            print only the number (with the unit's letter or name)\n\
         \x20 -h, --help                 this help\n\
         \x20 -V, --version              dmtool's version\n\
         SIZE is a number with an optional unit (none means sectors); UNIT is one of the \
         letters {UNIT_CHARS} (lower case powers of 1024, upper case powers of 1000; b bytes, \
         s sectors) or a unit name such as kibibytes. The estimate: 4 KiB for the superblock, \
         one 4 KiB mapping leaf per 126 data blocks and 4 KiB per thin. Keep in mind that the \
         pool holds back a tenth of its metadata device (at most 16 MiB) as a reserve.\n\
         Bad input exits 2; sizes past 64 bits are refused.\n\n\
         Example: dmtool metadata-size -b 64k -s 1t -m 1000 -u m\n"
    )
}

/// What `-n` asked for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Numeric {
    No,
    Plain,
    Short,
    Long,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Opt {
    Block,
    Pool,
    MaxThins,
}

struct Parsed {
    values: [u64; 3],
    described: [String; 3],
    unit: usize,
    numeric: Numeric,
}

/// What the options say to do.
enum Action {
    Help,
    Version,
    Estimate(Parsed),
}

/// `prg` names the tool in messages: `thin_metadata_size` through a link, else
/// `dmtool metadata-size`.
pub fn run(args: Args, prg: &str) -> anyhow::Result<ExitCode> {
    let words: Vec<String> = args
        .args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let parsed = match parse(&words) {
        Ok(Action::Help) => {
            output::write_stdout(help(prg).as_bytes())?;
            return Ok(ExitCode::SUCCESS);
        }
        Ok(Action::Version) => {
            output::write_stdout(format!("{}\n", env!("CARGO_PKG_VERSION")).as_bytes())?;
            return Ok(ExitCode::SUCCESS);
        }
        Ok(Action::Estimate(p)) => p,
        Err(msg) => {
            eprintln!("{prg} - {msg}");
            return Ok(ExitCode::from(2));
        }
    };
    let [block, pool, thins] = parsed.values;
    let sectors = match estimate_sectors(block, pool, thins) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{prg} - {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let text = render(prg, &parsed, sectors);
    output::write_stdout(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn render(prg: &str, p: &Parsed, sectors: u64) -> String {
    // thin_metadata_size computes in double precision; so do we, to print the same digits.
    let factor = unit_bytes(p.unit).expect("units past 64 bits are refused by parse");
    let r = sectors as f64 * 512.0 / factor as f64;
    let number = if r == r.floor() {
        format!("{}", r as u64)
    } else if r - r.floor() < 1e-2 {
        c_exp(r)
    } else {
        format!("{r:.2}")
    };
    let mut s = String::new();
    match p.numeric {
        Numeric::No => {
            let _ = write!(
                s,
                "{prg} - {number} {} estimated metadata area size for \"--block-size={} \
                 --pool-size={} --max-thins={}\"",
                UNIT_NAMES[p.unit], p.described[0], p.described[1], p.described[2]
            );
        }
        Numeric::Plain => s.push_str(&number),
        Numeric::Short => {
            let _ = write!(s, "{number}{}", &UNIT_CHARS[p.unit..p.unit + 1]);
        }
        Numeric::Long => {
            let _ = write!(s, "{number}{}", UNIT_NAMES[p.unit]);
        }
    }
    s.push('\n');
    s
}

/// C's `%0.2e`: two decimals and an exponent of at least two digits with its sign.
fn c_exp(r: f64) -> String {
    let rust = format!("{r:.2e}");
    let (mantissa, exp) = rust.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e}'s exponent is a number");
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}

/// Reads the options in order, as getopt_long would with `b:s:m:u:n::hV`.
fn parse(words: &[String]) -> Result<Action, String> {
    let mut p = Parsed {
        values: [0; 3],
        described: Default::default(),
        unit: SECTORS,
        numeric: Numeric::No,
    };
    let long_names = [
        "block-size",
        "pool-size",
        "max-thins",
        "unit",
        "numeric-only",
        "help",
        "version",
    ];
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        if w == "--" {
            break;
        }
        if let Some(long) = w.strip_prefix("--") {
            let (name, attached) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let exact = long_names.iter().position(|n| *n == name);
            let matches: Vec<usize> = (0..long_names.len())
                .filter(|&k| long_names[k].starts_with(name))
                .collect();
            let k = match (exact, matches.as_slice()) {
                (Some(k), _) => k,
                (None, [k]) => *k,
                (None, []) => return Err(format!("unrecognized option '--{name}'")),
                _ => return Err(format!("option '--{name}' is ambiguous")),
            };
            let letter = ['b', 's', 'm', 'u', 'n', 'h', 'V'][k];
            let arg = match letter {
                'b' | 's' | 'm' | 'u' => match attached {
                    Some(v) => Some(v),
                    None => {
                        let v = words
                            .get(i)
                            .ok_or_else(|| format!("option '--{name}' requires an argument"))?;
                        i += 1;
                        Some(v.clone())
                    }
                },
                'n' => attached,
                _ if attached.is_some() => {
                    return Err(format!("option '--{name}' doesn't allow an argument"))
                }
                _ => None,
            };
            if let Some(action) = apply(&mut p, letter, arg)? {
                return Ok(action);
            }
            continue;
        }
        let Some(cluster) = w.strip_prefix('-').filter(|c| !c.is_empty()) else {
            // Not an option: thin_metadata_size takes no operands and ignores them.
            continue;
        };
        for (at, c) in cluster.char_indices() {
            let rest = &cluster[at + c.len_utf8()..];
            let (arg, done) = match c {
                'b' | 's' | 'm' | 'u' if !rest.is_empty() => (Some(rest.to_string()), true),
                'b' | 's' | 'm' | 'u' => {
                    let v = words
                        .get(i)
                        .ok_or_else(|| format!("option requires an argument -- '{c}'"))?;
                    i += 1;
                    (Some(v.clone()), true)
                }
                'n' => ((!rest.is_empty()).then(|| rest.to_string()), true),
                'h' | 'V' => (None, false),
                _ => return Err(format!("invalid option -- '{c}'")),
            };
            if let Some(action) = apply(&mut p, c, arg)? {
                return Ok(action);
            }
            if done {
                break;
            }
        }
    }
    Ok(Action::Estimate(p))
}

/// One option; `Some` for help and version, which end the parse.
fn apply(p: &mut Parsed, letter: char, arg: Option<String>) -> Result<Option<Action>, String> {
    let slot = match letter {
        'h' => return Ok(Some(Action::Help)),
        'V' => return Ok(Some(Action::Version)),
        'u' => {
            let text = arg.unwrap_or_default();
            p.unit = unit_index(&text)
                .filter(|&u| unit_bytes(u).is_some())
                .ok_or("output unit specifier invalid!")?;
            return Ok(None);
        }
        'n' => {
            if p.numeric != Numeric::No {
                return Err("-n already given!".into());
            }
            p.numeric = match arg.as_deref() {
                None => Numeric::Plain,
                Some(a) if !a.is_empty() && "long".starts_with(a) => Numeric::Long,
                Some(a) if !a.is_empty() && "short".starts_with(a) => Numeric::Short,
                Some(_) => return Err("-n invalid option argument".into()),
            };
            return Ok(None);
        }
        'b' => Opt::Block,
        's' => Opt::Pool,
        _ => Opt::MaxThins,
    };
    let k = slot as usize;
    if p.values[k] != 0 {
        return Err("option already given!".into());
    }
    let text = arg.unwrap_or_default();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit_text) = text.split_at(digits_end);
    let n: u64 = if digits.is_empty() {
        0
    } else {
        digits
            .parse()
            .map_err(|_| format!("size {text:?} does not fit 64 bits"))?
    };
    let unit = if unit_text.is_empty() {
        None
    } else {
        Some(unit_index(unit_text).ok_or("Invalid unit specifier!")?)
    };
    let factor = unit_bytes(unit.unwrap_or(SECTORS))
        .ok_or_else(|| format!("unit of {text:?} does not fit 64 bits"))?;
    let bytes = n
        .checked_mul(factor)
        .ok_or_else(|| format!("size {text:?} does not fit 64 bits"))?;
    // Sizes count sectors; the thin count is a plain number (a unit multiplies it).
    p.values[k] = if unit.is_none() || slot != Opt::MaxThins {
        bytes / 512
    } else {
        bytes
    };
    p.described[k] = match unit {
        Some(u) => format!("{digits}{}", UNIT_NAMES[u]),
        None if slot == Opt::MaxThins => digits.to_string(),
        None => format!("{digits}{}", UNIT_NAMES[p.unit]),
    };
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(args: &[&str]) -> String {
        let words: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let Ok(Action::Estimate(p)) = parse(&words) else {
            panic!("{args:?} does not parse to an estimate")
        };
        let [b, s, m] = p.values;
        render("thin_metadata_size", &p, estimate_sectors(b, s, m).unwrap())
    }

    #[test]
    fn output_is_thin_metadata_sizes() {
        assert_eq!(
            estimate(&["-b", "64k", "-s", "1t", "-m", "1000"]),
            "thin_metadata_size - 1073224 sectors estimated metadata area size for \
             \"--block-size=64kibibytes --pool-size=1tebibytes --max-thins=1000\"\n"
        );
        assert_eq!(
            estimate(&["-b64k", "-s1t", "-m1000", "-um", "-n"]),
            "524.04\n"
        );
        assert_eq!(
            estimate(&["-b", "64k", "-s", "1t", "-m", "1000", "-u", "k", "-nlong"]),
            "536612kibibytes\n"
        );
    }

    #[test]
    fn c_exponent_format_has_a_signed_two_digit_exponent() {
        assert_eq!(c_exp(524.004), "5.24e+02");
        assert_eq!(c_exp(0.001234), "1.23e-03");
    }
}
