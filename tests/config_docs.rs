//! README's configuration table and the code cannot drift: every key the settings have is a row of the table with
//! the built-in default, and every row names a key the settings have.

use std::collections::BTreeMap;

use agent_connection_manager::Settings;

/// `section.key` → the built-in default, as TOML writes it (strings without their quotes).
fn code_defaults() -> BTreeMap<String, String> {
    let value = toml::Value::try_from(Settings::default()).expect("the default settings serialize to TOML");
    let mut keys = BTreeMap::new();
    for (section, table) in value.as_table().expect("settings are a table") {
        for (key, v) in table.as_table().unwrap_or_else(|| panic!("`{section}` is not a section")) {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            keys.insert(format!("{section}.{key}"), text);
        }
    }
    keys
}

/// `section.key` → the default column of README's table, without its backticks (`""` for an empty string).
fn readme_rows() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let section = readme.split("\n## Configuration").nth(1).expect("README.md has a section `## Configuration`");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (key, default) = (cells[1].trim_matches('`'), cells[2].trim_matches('`'));
        let default = if default == "\"\"" { String::new() } else { default.to_string() };
        assert!(rows.insert(key.to_string(), default).is_none(), "README's configuration table lists `{key}` twice");
    }
    rows
}

#[test]
fn readme_configuration_table_matches_the_settings_both_ways() {
    let code = code_defaults();
    let readme = readme_rows();
    let missing: Vec<_> = code.keys().filter(|k| !readme.contains_key(*k)).collect();
    let unknown: Vec<_> = readme.keys().filter(|k| !code.contains_key(*k)).collect();
    let wrong: Vec<_> = code
        .iter()
        .filter_map(|(k, v)| readme.get(k).filter(|r| *r != v).map(|r| format!("{k}: README says `{r}`, code `{v}`")))
        .collect();
    assert!(missing.is_empty(), "keys with no row in README's configuration table: {missing:?}");
    assert!(unknown.is_empty(), "README's configuration table names keys the settings do not have: {unknown:?}");
    assert!(wrong.is_empty(), "README's defaults differ from the code's:\n{}", wrong.join("\n"));
}
