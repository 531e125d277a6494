//! The arrows point down: the library's modules form layers (core, drivers, app), a module
//! imports only from layers below or beside it, and no two files of the daemon import each
//! other. Read from the sources, so a new import that breaks the layering fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::util;

/// Each top-level module of the library and its layer: a module may use modules of a lower
/// rank only (or of its own rank where it is listed among `BESIDE`).
const LAYERS: &[(&str, u32)] = &[
    // Leaves: weights, input decoding, process measurements, logging, error reports.
    ("nn", 0),
    ("stream", 0),
    ("metrics", 0),
    ("logging", 0),
    ("report", 0),
    // Core: what a model is, how it learns, how a sensor is mounted.
    ("model", 1),
    ("learn", 1),
    ("calibration", 1),
    // Metric objects both drivers update; a checkpoint keeps the accuracy on labels.
    ("scores", 2),
    ("checkpoint", 3),
    ("config", 4),
    ("session", 5),
    // Drivers of the session.
    ("replay", 6),
    ("daemon", 6),
    ("check", 6),
    // What only the application draws or prints.
    ("plot", 7),
];

/// The top-level module a file under src/ belongs to.
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every name right after `prefix` (e.g. `crate::` or `super::`) in a file, imports and
/// paths alike, comments included, so a doc link that would not resolve without the
/// dependency counts too.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let name: String = text[at + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let before = text[..at].chars().last();
        // `edgemt::...` in docs, or `$crate::` in macros, are not this crate's paths.
        if !name.is_empty() && before.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '$') {
            names.insert(name);
        }
    }
    names
}

#[test]
fn each_module_imports_only_from_the_layers_below_it() {
    let src = util::path("src");
    let rank: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel == Path::new("main.rs") || rel == Path::new("lib.rs") {
            continue;
        }
        let module = module_of(rel);
        let Some(&own) = rank.get(module.as_str()) else {
            panic!("{} is in no layer: add it to LAYERS", rel.display());
        };
        for used in names_after(&std::fs::read_to_string(file).unwrap(), "crate::") {
            if used == module {
                continue;
            }
            match rank.get(used.as_str()) {
                Some(&r) if r < own => {}
                Some(&r) => wrong.push(format!(
                    "{} (layer {own}) uses crate::{used} (layer {r})",
                    rel.display()
                )),
                None => panic!("{} uses crate::{used}, which is in no layer", rel.display()),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_files_of_the_daemon_import_each_other() {
    let dir = util::path("src/daemon");
    let mut files = Vec::new();
    sources(&dir, &mut files);
    let name = |p: &Path| p.file_stem().unwrap().to_string_lossy().to_string();
    let names: BTreeSet<String> = files.iter().map(|p| name(p)).collect();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let me = name(file);
        let used: BTreeSet<String> = if me == "mod" {
            // The parent uses a child through its module path.
            names
                .iter()
                .filter(|o| **o != me && text.contains(&format!("{o}::")))
                .cloned()
                .collect()
        } else {
            let mut refs = names_after(&text, "super::");
            refs.extend(names_after(&text, "crate::daemon::"));
            // A name that is no sibling file is an item of the parent's own (mod.rs).
            let parent = refs.iter().any(|r| !names.contains(r));
            let mut used: BTreeSet<String> = refs
                .into_iter()
                .filter(|r| names.contains(r) && *r != me)
                .collect();
            if parent {
                used.insert("mod".into());
            }
            used
        };
        uses.insert(me, used);
    }
    let mut mutual = Vec::new();
    for (a, used) in &uses {
        for b in used {
            if a < b && uses.get(b).is_some_and(|u| u.contains(a)) {
                mutual.push(format!("daemon/{a}.rs <-> daemon/{b}.rs"));
            }
        }
    }
    assert!(
        mutual.is_empty(),
        "daemon files that import each other:\n{}",
        mutual.join("\n")
    );
}
