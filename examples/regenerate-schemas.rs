//! Rewrites `schema/` and the generated tables of `docs/protocol.md` from the Rust types (`src/schema.rs`), removing
//! schema files the code no longer generates. `tests/schemas.rs` only compares; this is the one place that writes.
//!
//! Run from anywhere: `cargo run --example regenerate-schemas`.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("schema");
    let files = agent_connection_manager::schema::files();
    for sub in ["messages", "replies", "events"] {
        std::fs::create_dir_all(dir.join(sub))?;
        for entry in std::fs::read_dir(dir.join(sub))? {
            let entry = entry?;
            let rel = format!("{sub}/{}", entry.file_name().to_string_lossy());
            if !files.iter().any(|(p, _)| *p == rel) {
                std::fs::remove_file(entry.path())?;
                println!("removed schema/{rel}");
            }
        }
    }
    for (rel, text) in &files {
        let path = dir.join(rel);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text)?;
            println!("wrote schema/{rel}");
        }
    }
    let protocol = root.join("docs/protocol.md");
    let doc = std::fs::read_to_string(&protocol)?;
    let new = agent_connection_manager::schema::with_protocol_tables(&doc)?;
    if new != doc {
        std::fs::write(&protocol, new)?;
        println!("wrote docs/protocol.md");
    }
    Ok(())
}
