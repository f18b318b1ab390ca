//! Output helpers shared by the verbs: Docker's human sizes and durations, and the small
//! subset of Go templates `--format` takes here: `{{.Field}}`, `{{.A.B}}`, `{{json .X}}`,
//! `{{json .}}`, and the words `json` (the whole value as JSON).

use serde_json::Value;

/// `text` cut to `width` characters, the last one an ellipsis when anything was cut (how
/// Docker shortens commands in `ps` and `history`).
pub fn ellipsis(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Docker's `units.HumanSize`: decimal units, four significant digits (`65.54kB`, `1.085MB`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    let int_digits = if value < 1.0 {
        1
    } else {
        value.log10().floor() as usize + 1
    };
    let decimals = 4usize.saturating_sub(int_digits);
    let mut text = format!("{value:.decimals$}");
    if text.contains('.') {
        text = text.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{text}{}", UNITS[unit])
}

/// Docker's `units.HumanDuration` plus " ago".
pub fn human_since(seconds: u64) -> String {
    let (m, h, d) = (seconds / 60, seconds / 3600, seconds / 86400);
    let text = if seconds < 1 {
        "Less than a second".to_string()
    } else if seconds == 1 {
        "1 second".to_string()
    } else if seconds < 60 {
        format!("{seconds} seconds")
    } else if m == 1 {
        "About a minute".to_string()
    } else if m < 60 {
        format!("{m} minutes")
    } else if h == 1 {
        "About an hour".to_string()
    } else if h < 48 {
        format!("{h} hours")
    } else if h < 24 * 7 * 2 {
        format!("{d} days")
    } else if h < 24 * 30 * 2 {
        format!("{} weeks", d / 7)
    } else if h < 24 * 365 * 2 {
        format!("{} months", d / 30)
    } else {
        format!("{} years", d / 365)
    };
    format!("{text} ago")
}

/// Seconds since the RFC 3339 time `created`, if it parses.
pub fn seconds_since(created: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(created.trim_end_matches('Z')).ok()?;
    Some(
        std::time::SystemTime::now()
            .duration_since(t)
            .map_or(0, |d| d.as_secs()),
    )
}

fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.trim_start_matches('.')
        .split('.')
        .filter(|p| !p.is_empty())
        .try_fold(value, |v, key| v.get(key))
}

fn plain(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "<no value>".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// Renders `template` against `value`.
pub fn render(template: &str, value: &Value) -> anyhow::Result<String> {
    if template == "json" {
        return Ok(serde_json::to_string(value)?);
    }
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| anyhow::anyhow!("template {template:?}: unclosed {{{{"))?;
        let action = rest[start + 2..start + end].trim();
        if let Some(arg) = action.strip_prefix("json ") {
            out.push_str(&serde_json::to_string(
                &lookup(value, arg.trim()).unwrap_or(&Value::Null),
            )?);
        } else if action.starts_with('.') {
            out.push_str(&plain(lookup(value, action)));
        } else {
            anyhow::bail!(
                "template {template:?}: only {{{{.Field}}}} and {{{{json .Field}}}} are supported"
            );
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out.replace("\\t", "\t").replace("\\n", "\n"))
}

/// The rows of a listing verb (`images`, `ps`, `history`, `system df`): each through
/// `template` when `--format` gave one, else a table whose columns are `(header, field)`.
pub fn listing<'v>(
    rows: impl IntoIterator<Item = &'v Value>,
    template: Option<&str>,
    table: &[(&str, &str)],
) -> anyhow::Result<String> {
    if let Some(template) = template {
        let mut out = String::new();
        for r in rows {
            out.push_str(&render(template, r)?);
            out.push('\n');
        }
        return Ok(out);
    }
    let mut cells = vec![table.iter().map(|(h, _)| h.to_string()).collect()];
    cells.extend(rows.into_iter().map(|r| {
        table
            .iter()
            .map(|(_, f)| r[*f].as_str().unwrap_or_default().to_string())
            .collect()
    }));
    Ok(columns(&cells))
}

/// Left-aligned columns three spaces apart, as Docker's tabwriter prints them.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human_size(65536), "65.54kB");
        assert_eq!(human_size(1_084_801), "1.085MB");
        assert_eq!(human_size(10 << 30), "10.74GB");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(0), "0B");
    }

    #[test]
    fn durations_read_like_docker() {
        assert_eq!(human_since(0), "Less than a second ago");
        assert_eq!(human_since(90), "About a minute ago");
        assert_eq!(human_since(3 * 3600), "3 hours ago");
        assert_eq!(human_since(3 * 86400), "3 days ago");
    }

    #[test]
    fn templates_pick_fields() {
        let v = serde_json::json!({"Id": "sha256:ab", "Config": {"Cmd": ["sh"]}});
        assert_eq!(render("{{.Id}}", &v).unwrap(), "sha256:ab");
        assert_eq!(render("{{json .Config.Cmd}}", &v).unwrap(), "[\"sh\"]");
        assert_eq!(render("x={{.Nope}}", &v).unwrap(), "x=<no value>");
        assert!(render("{{if .Id}}", &v).is_err());
    }
}
