//! The documented example config (`systemd/agent.toml`) and the configuration reference
//! (`docs/src/reference/config.md`) against the parser: every key the parser accepts is in both,
//! neither names a key the parser refuses, and the defaults they show are the parser's.
//!
//! The parser's keys come from serializing a parsed `Config`: serde names every field, an unset
//! optional one as null. The example sets every optional key too once each `# key = value` and
//! `# [section]` line is uncommented, so that config has no null left.

use flightnode_agent::config::Config;
use flightnode_tests::reference::{Page, assert_same};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const EXAMPLE: &str = "systemd/agent.toml";

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(EXAMPLE)
}

fn example_text() -> String {
    std::fs::read_to_string(example_path()).unwrap_or_else(|e| panic!("reading {EXAMPLE}: {e}"))
}

/// `key = …` (after a `# `, for a commented-out one): the key.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once(" = ")?;
    (!key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
    .then_some(key)
}

/// `[section]`, maybe followed by a comment: the section.
fn section_of(line: &str) -> Option<&str> {
    let (name, rest) = line.strip_prefix('[')?.split_once(']')?;
    let rest = rest.trim_start();
    (key_of(&format!("{name} = ")).is_some() && (rest.is_empty() || rest.starts_with('#'))).then_some(name)
}

/// The example with every commented-out key and section header uncommented.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if key_of(rest).is_some() || section_of(rest).is_some() => rest,
            _ => line,
        })
        .fold(String::new(), |out, line| out + line + "\n")
}

/// `section.key` (or `key` at the top) of every key line, set or commented out, with its line
/// index and whether it is commented out.
fn key_lines(text: &str) -> BTreeMap<String, (usize, bool)> {
    let mut section = String::new();
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let (rest, commented) = match line.strip_prefix("# ") {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        if let Some(name) = section_of(rest) {
            name.clone_into(&mut section);
        } else if let Some(key) = key_of(rest) {
            let path = if section.is_empty() {
                key.to_owned()
            } else {
                format!("{section}.{key}")
            };
            let before = out.insert(path.clone(), (i, commented));
            assert!(before.is_none(), "{EXAMPLE} names {path} twice");
        }
    }
    out
}

/// The keys of a parsed config, `section.key`, with their values (null = unset).
fn keys(cfg: &Config) -> BTreeMap<String, Value> {
    let Value::Object(top) = serde_json::to_value(cfg).expect("a config serializes") else {
        panic!("a config serializes to a table");
    };
    let mut out = BTreeMap::new();
    for (key, value) in top {
        match value {
            Value::Object(section) => {
                for (k, v) in section {
                    out.insert(format!("{key}.{k}"), v);
                }
            }
            other => {
                out.insert(key, other);
            }
        }
    }
    out
}

fn parse(text: &str, what: &str) -> Result<Config, String> {
    Config::parse(text, Path::new(what)).map_err(|e| e.to_string())
}

/// Every key of the example set (the uncommented example, parsed).
fn full() -> (String, BTreeMap<String, Value>) {
    let text = uncommented(&example_text());
    let cfg = parse(&text, "agent.toml, every key uncommented").unwrap_or_else(|e| {
        panic!("{EXAMPLE} with every `# key = value` and `# [section]` uncommented does not parse: {e}")
    });
    (text, keys(&cfg))
}

/// `text` with the line of `path` replaced by `line` (or left out).
fn with_line(text: &str, path: &str, line: Option<&str>) -> String {
    let (index, _) = *key_lines(text)
        .get(path)
        .unwrap_or_else(|| panic!("{EXAMPLE} has no line for `{path}`"));
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| if i == index { line } else { Some(l) })
        .fold(String::new(), |out, l| out + l + "\n")
}

/// What the parser makes of a key the full config leaves out.
#[derive(Debug)]
enum KeyDefault {
    /// The parse fails for the missing field.
    Required,
    /// The parse fails, but for a rule tying it to a key that is still set (`mqtt.cert` without
    /// `mqtt.key`): it has no default of its own.
    Tied(String),
    /// Its default; null when it stays unset.
    Value(Value),
}

fn default_of(text: &str, path: &str) -> KeyDefault {
    match parse(&with_line(text, path, None), "agent.toml without one key") {
        Ok(cfg) => KeyDefault::Value(keys(&cfg).remove(path).unwrap_or(Value::Null)),
        Err(e) if e.contains("missing field") => KeyDefault::Required,
        Err(e) => KeyDefault::Tied(e),
    }
}

#[test]
fn example_agent_toml_is_valid() {
    let cfg = Config::load(&example_path()).unwrap();
    assert_eq!(cfg.device_id, "drone-0001");
    assert_eq!(cfg.download.checkpoint_bytes, 8 << 20);
    // Left to the default, which follows the cores of the computer it runs on.
    assert_eq!(cfg.download.chunk_workers, None);
    // The optional links stay off until the device is given a broker and a hub.
    assert!(cfg.mqtt.is_none() && cfg.hub.is_none() && cfg.flight.is_none());
}

#[test]
fn example_agent_toml_names_every_key_the_parser_accepts() {
    let (_, keys) = full();
    let unset: Vec<&String> = keys.iter().filter(|(_, v)| v.is_null()).map(|(k, _)| k).collect();
    assert!(
        unset.is_empty(),
        "the config parser accepts {unset:?}, but {EXAMPLE} does not set them even with every \
         `# key = value` line uncommented: add each as a commented-out line with its default or an example"
    );
    let parser: BTreeSet<String> = keys.into_keys().collect();
    let example: BTreeSet<String> = key_lines(&example_text()).into_keys().collect();
    assert_same("config keys", &parser, "the config parser", &example, EXAMPLE);
}

#[test]
fn commented_out_keys_show_their_defaults() {
    let (text, full) = full();
    let mut wrong = Vec::new();
    for (path, (_, commented)) in key_lines(&example_text()) {
        if !commented {
            continue;
        }
        // Required within an optional section, or optional without a default (an example):
        // nothing to compare.
        let KeyDefault::Value(default) = default_of(&text, &path) else {
            continue;
        };
        if !default.is_null() && default != full[&path] {
            wrong.push(format!(
                "{path}: shows {} but the default is {default}",
                full[&path]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "commented-out keys in {EXAMPLE} must show the default they stand for:\n{}",
        wrong.join("\n")
    );
}

/// The keys `config.md` documents, by `## [section]` (`## Top-level keys` for the rest), each
/// with its default cell.
fn reference_keys(page: &Page) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for section in page.sections(2) {
        let prefix = if section.heading == "Top-level keys" {
            String::new()
        } else if let Some(name) = section
            .heading
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
        {
            format!("{name}.")
        } else {
            assert!(
                section.table_keys().is_empty(),
                "{} documents keys outside a `## [section]` or `## Top-level keys` heading",
                section.at(page)
            );
            continue;
        };
        for row in section.table_rows() {
            assert!(
                row.len() >= 4,
                "{}: the row of `{}` needs the columns key, type, default, meaning",
                section.at(page),
                row[0]
            );
            out.insert(format!("{prefix}{}", row[0]), row[2].clone());
        }
    }
    out
}

#[test]
fn config_reference_documents_every_key_with_the_parsers_default() {
    let page = Page::reference("config");
    let documented = reference_keys(&page);
    let (text, full) = full();
    let parser: BTreeSet<String> = full.keys().cloned().collect();
    let on_page: BTreeSet<String> = documented.keys().cloned().collect();
    assert_same("config keys", &parser, "the config parser", &on_page, &page.path);

    let mut wrong = Vec::new();
    for (path, cell) in &documented {
        let default = default_of(&text, path);
        let key = path.rsplit('.').next().unwrap_or(path);
        let claim = if cell.starts_with("required") {
            match default {
                KeyDefault::Required => Ok(()),
                KeyDefault::Tied(e) => Err(format!("leaving it out fails for another reason: {e}")),
                KeyDefault::Value(v) => Err(format!("it is not required: its default is {v}")),
            }
        } else if cell.starts_with("unset") {
            match default {
                KeyDefault::Value(Value::Null) | KeyDefault::Tied(_) => Ok(()),
                other => Err(format!("it is not unset by default: {other:?}")),
            }
        } else if let Some(value) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
            let line = format!("{key} = {value}");
            match (
                parse(&with_line(&text, path, Some(&line)), "agent.toml"),
                &default,
            ) {
                (Err(e), _) => Err(format!("`{line}` does not parse: {e}")),
                (Ok(cfg), KeyDefault::Value(default)) if keys(&cfg)[path] == *default => Ok(()),
                (Ok(_), default) => Err(format!("the parser's default is {default:?}")),
            }
        } else {
            Err("the default cell must be `required…`, `unset…` or a TOML value in backticks".to_owned())
        };
        if let Err(why) = claim {
            wrong.push(format!("{path} (default {cell}): {why}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} states defaults the parser does not have:\n{}",
        page.path,
        wrong.join("\n")
    );
}
