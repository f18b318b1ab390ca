//! `commit -c` lines: the Dockerfile instructions that change an image's config (`CMD`,
//! `ENTRYPOINT`, `ENV`, `WORKDIR`, `USER`, `LABEL`, `EXPOSE`, `STOPSIGNAL`, `VOLUME`), applied
//! to a config object (Docker's `Config`: `Cmd`, `Env`, ...) the way a Dockerfile would.

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::container::spec::set_env;

/// Applies `lines` in order, as Docker's commit does: an ENTRYPOINT clears the Cmd unless a
/// CMD came before it in the same list. A bad line is an error naming it.
pub fn apply_all(config: &mut Map<String, Value>, lines: &[String]) -> anyhow::Result<()> {
    let mut cmd_given = false;
    for line in lines {
        apply(config, line).with_context(|| format!("invalid change {line:?}"))?;
        let word = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match word.as_str() {
            "CMD" => cmd_given = true,
            "ENTRYPOINT" if !cmd_given => {
                config.insert("Cmd".into(), Value::Null);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Applies one instruction, e.g. `CMD ["sh", "-c", "ls"]` or `ENV A=1 B="two words"`.
pub fn apply(config: &mut Map<String, Value>, line: &str) -> anyhow::Result<()> {
    let line = line.trim();
    let (word, rest) = line
        .split_once(|c: char| c.is_whitespace())
        .map_or((line, ""), |(w, r)| (w, r.trim()));
    let instruction = word.to_ascii_uppercase();
    match instruction.as_str() {
        "CMD" => {
            config.insert("Cmd".into(), json!(command_form(rest)?));
        }
        "ENTRYPOINT" => {
            config.insert("Entrypoint".into(), json!(command_form(rest)?));
        }
        "ENV" => {
            let mut env: Vec<String> = string_list(config.get("Env"));
            for (key, value) in pairs(rest, "ENV")? {
                set_env(&mut env, format!("{key}={value}"));
            }
            config.insert("Env".into(), json!(env));
        }
        "LABEL" => {
            let labels = object(config, "Labels");
            for (key, value) in pairs(rest, "LABEL")? {
                labels.insert(key, json!(value));
            }
        }
        "WORKDIR" => {
            let dir = words(rest)?.join(" ");
            if dir.is_empty() {
                bail!("WORKDIR requires exactly one argument");
            }
            let old = config
                .get("WorkingDir")
                .and_then(Value::as_str)
                .unwrap_or("");
            // A relative WORKDIR goes on from the previous one, as in a Dockerfile.
            let dir = if dir.starts_with('/') {
                dir
            } else {
                format!("{}/{dir}", old.trim_end_matches('/'))
            };
            config.insert("WorkingDir".into(), json!(dir));
        }
        "USER" => {
            let user = one_argument(rest, "USER")?;
            config.insert("User".into(), json!(user));
        }
        "STOPSIGNAL" => {
            let signal = one_argument(rest, "STOPSIGNAL")?;
            config.insert("StopSignal".into(), json!(signal));
        }
        "EXPOSE" => {
            let ports = object(config, "ExposedPorts");
            for port in words(rest)? {
                ports.insert(port_key(&port)?, json!({}));
            }
        }
        "VOLUME" => {
            let volumes = object(config, "Volumes");
            let list: Vec<String> = if rest.starts_with('[') {
                serde_json::from_str(rest).context("VOLUME: the JSON list is malformed")?
            } else {
                words(rest)?
            };
            for v in list {
                volumes.insert(v, json!({}));
            }
        }
        "" => bail!("empty change"),
        other => bail!(
            "{other} is not a valid change command (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, \
             STOPSIGNAL, USER, VOLUME, WORKDIR)"
        ),
    }
    Ok(())
}

/// `["a", "b"]` (exec form) or `a b` (shell form: `/bin/sh -c "a b"`).
fn command_form(rest: &str) -> anyhow::Result<Vec<String>> {
    if rest.starts_with('[') {
        if let Ok(list) = serde_json::from_str::<Vec<String>>(rest) {
            return Ok(list);
        }
    }
    // Docker, too, treats what does not parse as a JSON list as shell form.
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec!["/bin/sh".into(), "-c".into(), rest.into()])
}

fn string_list(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// The object at `key`, made if missing or null.
fn object<'c>(config: &'c mut Map<String, Value>, key: &str) -> &'c mut Map<String, Value> {
    let slot = config.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("made an object just above")
}

fn one_argument(rest: &str, what: &str) -> anyhow::Result<String> {
    match words(rest)?.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("{what} requires exactly one argument"),
    }
}

/// `80`, `80/tcp`, `53/udp` as the config's key (`80/tcp`).
fn port_key(port: &str) -> anyhow::Result<String> {
    let (number, proto) = port.split_once('/').unwrap_or((port, "tcp"));
    let proto = proto.to_ascii_lowercase();
    let valid = number.parse::<u16>().is_ok_and(|n| n > 0);
    if !valid || !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
        bail!("EXPOSE: invalid port {port:?}");
    }
    Ok(format!("{number}/{proto}"))
}

/// `KEY=VALUE ...` (values may be quoted), or the old form `KEY VALUE WITH SPACES`.
fn pairs(rest: &str, what: &str) -> anyhow::Result<Vec<(String, String)>> {
    let list = words(rest)?;
    let Some(first) = list.first() else {
        bail!("{what} requires at least one argument");
    };
    if !first.contains('=') {
        // The old form: the first word is the key, everything after it the value.
        let value = rest[rest.find(char::is_whitespace).unwrap_or(rest.len())..].trim();
        if value.is_empty() {
            bail!("{what} {first}: no value (use {first}=VALUE)");
        }
        return Ok(vec![(first.clone(), unquote_all(value)?)]);
    }
    list.into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{what}: {w:?} is not KEY=VALUE"),
        })
        .collect()
}

fn unquote_all(text: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => out.push(c),
            (_, '\\') => out.push(chars.next().unwrap_or('\\')),
            (_, c) => out.push(c),
        }
    }
    if let Some(q) = quote {
        bail!("unmatched {q} in {text:?}");
    }
    Ok(out)
}

/// Splits on unquoted white space; quotes group and are removed, `\` escapes the next
/// character (not within single quotes).
fn words(text: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => word.push(c),
            (_, '\\') => {
                word.push(chars.next().unwrap_or('\\'));
                in_word = true;
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        bail!("unmatched {q} in {text:?}");
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(lines: &[&str]) -> Value {
        let mut config = json!({"Env": ["PATH=/bin", "A=old"], "WorkingDir": "/srv"})
            .as_object()
            .unwrap()
            .clone();
        for line in lines {
            apply(&mut config, line).unwrap();
        }
        Value::Object(config)
    }

    #[test]
    fn cmd_and_entrypoint_take_both_forms() {
        let c = applied(&[r#"CMD ["cat", "/hello"]"#, "ENTRYPOINT echo hi"]);
        assert_eq!(c["Cmd"], json!(["cat", "/hello"]));
        assert_eq!(c["Entrypoint"], json!(["/bin/sh", "-c", "echo hi"]));
        assert_eq!(applied(&["cmd [\"x\"]"])["Cmd"], json!(["x"]));
    }

    #[test]
    fn an_entrypoint_clears_the_cmd_unless_a_cmd_came_first() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut config = json!({"Cmd": ["old"]}).as_object().unwrap().clone();
        apply_all(&mut config, &lines(&["ENTRYPOINT [\"e\"]"])).unwrap();
        assert_eq!(config["Cmd"], Value::Null);
        let mut config = json!({"Cmd": ["old"]}).as_object().unwrap().clone();
        apply_all(&mut config, &lines(&["CMD [\"c\"]", "ENTRYPOINT [\"e\"]"])).unwrap();
        assert_eq!(config["Cmd"], json!(["c"]));
    }

    #[test]
    fn env_and_label_pairs_with_quotes_and_the_old_form() {
        let c = applied(&[
            r#"ENV A=1 B="two words" C=x\ y"#,
            "ENV D the rest of the line",
            r#"LABEL org.title="thin box" v=2"#,
        ]);
        assert_eq!(
            c["Env"],
            json!([
                "PATH=/bin",
                "A=1",
                "B=two words",
                "C=x y",
                "D=the rest of the line"
            ])
        );
        assert_eq!(c["Labels"], json!({"org.title": "thin box", "v": "2"}));
    }

    #[test]
    fn workdir_user_expose_volume() {
        let c = applied(&[
            "WORKDIR app",
            "WORKDIR sub",
            "USER 1000:1000",
            "EXPOSE 80 53/udp",
            r#"VOLUME ["/data"]"#,
            "STOPSIGNAL SIGINT",
        ]);
        assert_eq!(c["WorkingDir"], json!("/srv/app/sub"));
        assert_eq!(c["User"], json!("1000:1000"));
        assert_eq!(c["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}}));
        assert_eq!(c["Volumes"], json!({"/data": {}}));
        assert_eq!(c["StopSignal"], json!("SIGINT"));
    }

    #[test]
    fn bad_changes_are_refused_with_the_reason() {
        let mut config = Map::new();
        for (line, why) in [
            ("RUN rm -rf /", "not a valid change command"),
            ("USER a b", "exactly one argument"),
            ("EXPOSE 99999", "invalid port"),
            ("ENV", "at least one argument"),
            ("ENV A=\"open", "unmatched"),
            ("LABEL =x", "not KEY=VALUE"),
            ("", "empty change"),
        ] {
            let err = apply(&mut config, line).unwrap_err().to_string();
            assert!(err.contains(why), "{line:?}: {err}");
        }
    }
}
