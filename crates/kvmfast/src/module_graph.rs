//! Keeps the crate's module graph acyclic: every module's references to other modules
//! (`use crate::..`, `super::..`, `child::..` paths, outside `#[cfg(test)] mod tests`)
//! are read from the sources, and a cycle fails `cargo test` with its path. A cycle
//! means two files that cannot be understood, or moved, one without the other.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// A module (`"emulate::cpu"`; the crate root is `""`) and the modules it refers to.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// One source file: its module path and its text.
struct Source {
    module: Vec<String>,
    text: String,
}

/// `src/emulate/cpu.rs` -> `["emulate", "cpu"]`; `mod.rs` and `lib.rs` name their
/// directory. Unit-test files (`tests.rs`) are left out: tests may use anything.
fn module_of(relative: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    match parts.last().map(String::as_str) {
        Some("tests") => return None,
        Some("mod" | "lib") => {
            parts.pop();
        }
        _ => {}
    }
    Some(parts)
}

fn read_sources(dir: &Path, root: &Path, out: &mut Vec<Source>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("the crate's src directory is readable")
        .map(|entry| entry.expect("a readable directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_sources(&path, root, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let relative = path.strip_prefix(root).expect("under src");
            if let Some(module) = module_of(relative) {
                let text = fs::read_to_string(&path).expect("a readable source file");
                out.push(Source { module, text });
            }
        }
    }
}

/// The text without comments and without the unit-test module at its end.
fn production_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let line = line.split("//").next().unwrap_or("");
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e` (whitespace already removed).
fn expand_group(prefix: &str, body: &str, out: &mut Vec<String>) {
    let mut depth = 0;
    let mut item = String::new();
    let mut items = Vec::new();
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            items.push(std::mem::take(&mut item));
        } else {
            item.push(c);
        }
    }
    items.push(item);
    for item in items.into_iter().filter(|item| !item.is_empty()) {
        match item.find('{') {
            Some(open) => {
                let inner = &item[open + 1..item.len() - 1];
                expand_group(&format!("{prefix}{}", &item[..open]), inner, out);
            }
            None => out.push(format!("{prefix}{item}")),
        }
    }
}

/// Every path the code names: the items of each `use` (groups expanded), and each
/// `a::b::c` chain elsewhere (a chain inside a `use` is found twice; that is harmless).
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let starts_word = rest[..at].chars().next_back().is_none_or(|c| !is_ident(c));
        let after = &rest[at + 4..];
        let Some(end) = after.find(';') else { break };
        if starts_word {
            let statement: String = after[..end]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let mut items = Vec::new();
            expand_group("", &statement, &mut items);
            found.extend(items);
        }
        rest = &after[end..];
    }
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if !is_ident(chars[i]) || (i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let mut chain = String::new();
        while i < chars.len() && (is_ident(chars[i]) || chars[i] == ':') {
            chain.push(chars[i]);
            i += 1;
        }
        if chain.contains("::") {
            found.push(chain);
        }
    }
    found
        .into_iter()
        .map(|path| {
            path.split("::")
                .filter(|segment| !segment.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// The module a path from `from` refers to: the longest prefix that is a module other
/// than `from` itself, after `crate`, `self` and `super` are applied.
fn resolve(from: &[String], path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<String> {
    // After `crate`, `self` or `super` the path may name an item of that module itself
    // (`super::Stop`); a bare first segment must be a child module.
    let (mut base, mut rest, shortest): (Vec<String>, &[String], usize) =
        match path.first()?.as_str() {
            "crate" => (Vec::new(), &path[1..], 0),
            "self" => (from.to_vec(), &path[1..], 0),
            "super" => (from[..from.len().saturating_sub(1)].to_vec(), &path[1..], 0),
            _ => (from.to_vec(), path, 1),
        };
    while rest.first().is_some_and(|segment| segment == "super") {
        base.pop();
        rest = &rest[1..];
    }
    if rest.is_empty() {
        // `crate::{..}`: the group's items are paths of their own.
        return None;
    }
    (shortest..=rest.len()).rev().find_map(|take| {
        let mut candidate = base.clone();
        candidate.extend_from_slice(&rest[..take]);
        (modules.contains(&candidate) && candidate != from).then(|| candidate.join("::"))
    })
}

fn graph(sources: &[Source]) -> Graph {
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    sources
        .iter()
        .map(|source| {
            let targets = paths(&production_code(&source.text))
                .iter()
                .filter_map(|path| resolve(&source.module, path, &modules))
                .collect();
            (source.module.join("::"), targets)
        })
        .collect()
}

/// The first cycle found, as the modules along it (the first repeated at the end).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack
                    .iter()
                    .position(|n| n == node)
                    .expect("open is on the stack");
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(files: &[(&str, &str)]) -> Vec<Source> {
        files
            .iter()
            .filter_map(|(path, text)| {
                Some(Source {
                    module: module_of(Path::new(path))?,
                    text: (*text).to_string(),
                })
            })
            .collect()
    }

    fn edges(graph: &Graph, module: &str) -> Vec<String> {
        graph[module].iter().cloned().collect()
    }

    #[test]
    fn the_crate_has_no_module_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        read_sources(&root, &root, &mut found);
        let graph = graph(&found);
        // The check saw the crate: the run loop's known dependencies are edges.
        assert!(graph["vcpu"].contains("run_loop"));
        assert!(graph["emulate::bitcount"].contains("emulate::completion"));
        if let Some(cycle) = find_cycle(&graph) {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }

    #[test]
    fn use_groups_crate_self_and_super_paths_resolve_to_modules() {
        let graph = graph(&sources(&[
            ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
            ("a.rs", "use crate::{b::{self, X}, c::Y};\n"),
            ("b.rs", "fn f() { crate::c::g(); }\n"),
            ("c/mod.rs", "mod d;\nuse d::Z;\n"),
            ("c/d.rs", "use super::super::b::W;\nuse super::Q;\n"),
            ("c/tests.rs", "use crate::a::V;\n"),
        ]));
        assert_eq!(edges(&graph, "a"), ["b", "c"]);
        assert_eq!(edges(&graph, "b"), ["c"]);
        assert_eq!(edges(&graph, "c"), ["c::d"]);
        assert_eq!(edges(&graph, "c::d"), ["b", "c"]);
        assert!(!graph.contains_key("c::tests"));
    }

    #[test]
    fn comments_and_the_unit_test_module_are_not_dependencies() {
        let graph = graph(&sources(&[
            (
                "a.rs",
                "// crate::b::X\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::b::Y;\n}\n",
            ),
            ("b.rs", "use crate::a::f;\n"),
        ]));
        assert!(edges(&graph, "a").is_empty());
        assert_eq!(find_cycle(&graph), None);
    }

    #[test]
    fn a_cycle_is_found_with_its_path() {
        let graph = graph(&sources(&[
            ("kvm.rs", "use crate::vm::Vm;\n"),
            ("vm.rs", "use crate::vcpu::Vcpu;\n"),
            ("vcpu.rs", "use crate::run_loop::RunError;\n"),
            ("run_loop.rs", "use crate::vcpu::VcpuCore;\n"),
        ]));
        assert_eq!(
            find_cycle(&graph),
            Some(vec!["vcpu".into(), "run_loop".into(), "vcpu".into()])
        );
    }

    #[test]
    fn a_child_using_its_parent_is_a_cycle_when_the_parent_uses_it() {
        let graph = graph(&sources(&[
            (
                "emulate/mod.rs",
                "pub mod bitcount;\nfn f() { bitcount::complete(); }\n",
            ),
            ("emulate/bitcount.rs", "use super::{Completion, Stop};\n"),
        ]));
        assert_eq!(
            find_cycle(&graph),
            Some(vec![
                "emulate".into(),
                "emulate::bitcount".into(),
                "emulate".into()
            ])
        );
    }
}
