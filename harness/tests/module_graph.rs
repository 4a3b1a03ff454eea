//! The module import graphs of the harness's backends and of meterd have no circles, and no
//! backend imports another. An edge is any path a module's code names (`use` lines and paths in
//! code: `crate::…`, `super::…`, `self::…`, a child module's name); test modules are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`backend::qemu::vm`) → source text without its test module.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            // Binaries are crates of their own (they reach the library by its name).
            let stem = path.file_stem().unwrap_or_default();
            if parts.first().map(String::as_str) == Some("bin") || stem == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            found.insert(parts.join("::"), without_test_module(&text));
        }
    }
    found
}

/// `text` without its `#[cfg(test)] mod tests { … }` (other `#[cfg(test)]` items stay: they
/// are few and name no modules the rest does not).
fn without_test_module(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        let marker_end = at + "#[cfg(test)]".len();
        let after = rest[marker_end..].trim_start();
        if !after.starts_with("mod ") {
            out.push_str(&rest[..marker_end]);
            rest = &rest[marker_end..];
            continue;
        }
        out.push_str(&rest[..at]);
        let Some(open) = after.find('{') else {
            return out;
        };
        let mut depth = 0;
        let mut end = after.len();
        for (k, c) in after.char_indices().skip_while(|(k, _)| *k < open) {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The paths `code` names: each a list of segments after its root (`crate`, `super`, …).
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let code: String = code
        .lines()
        .map(|l| match l.find("//") {
            Some(at) if at == 0 || l[..at].ends_with(char::is_whitespace) => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bytes: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        if !boundary || !(bytes[i].is_alphabetic() || bytes[i] == '_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_alphanumeric() || bytes[i] == '_') {
            i += 1;
        }
        let root: String = bytes[start..i].iter().collect();
        if i + 1 < bytes.len() && bytes[i] == ':' && bytes[i + 1] == ':' {
            let (segments, end) = rest_of_path(&bytes, i);
            for segs in segments {
                out.push((root.clone(), segs));
            }
            i = end;
        }
    }
    out
}

/// Reads `::a::b` or `::{a, b::c}` from `at`; returns every path and where reading stopped.
fn rest_of_path(chars: &[char], mut at: usize) -> (Vec<Vec<String>>, usize) {
    let mut segments = Vec::new();
    while at + 1 < chars.len() && chars[at] == ':' && chars[at + 1] == ':' {
        at += 2;
        if chars.get(at) == Some(&'{') {
            let mut depth = 0;
            let start = at + 1;
            let mut end = start;
            for (k, c) in chars.iter().enumerate().skip(at) {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = k;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let inner: String = chars[start..end].iter().collect();
            let mut all = Vec::new();
            for item in split_top(&inner) {
                let item: Vec<char> = format!("x::{}", item.trim()).chars().collect();
                let (subs, _) = rest_of_path(&item, 1);
                for sub in subs {
                    let mut full = segments.clone();
                    full.extend(sub);
                    all.push(full);
                }
            }
            return (all, end + 1);
        }
        let start = at;
        while at < chars.len()
            && (chars[at].is_alphanumeric() || chars[at] == '_' || chars[at] == '*')
        {
            at += 1;
        }
        if start == at {
            break;
        }
        segments.push(chars[start..at].iter().collect());
    }
    (vec![segments], at)
}

/// Splits `a, b::{c, d}, e` at its top-level commas.
fn split_top(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// Module → the modules its code names.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let mut edges = BTreeMap::new();
    for (module, code) in &modules {
        let here: Vec<String> = if module.is_empty() {
            Vec::new()
        } else {
            module.split("::").map(str::to_owned).collect()
        };
        // Modules a `use` line names by their last segment: `use super::sim;` makes
        // `sim::usb::X` a path into `backend::sim::usb`.
        let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (root, segments) in paths(code) {
            let base: Vec<String> = match root.as_str() {
                "crate" => Vec::new(),
                "self" => here.clone(),
                "super" => here[..here.len().saturating_sub(1)].to_vec(),
                _ => continue,
            };
            let mut full = base;
            let mut rest = segments.into_iter().peekable();
            while rest.peek().map(String::as_str) == Some("super") {
                rest.next();
                full.pop();
            }
            full.extend(rest);
            if let Some(last) = full.last().cloned()
                && known.contains(&full.join("::"))
            {
                aliases.insert(last, full);
            }
        }
        let mut targets = BTreeSet::new();
        for (root, segments) in paths(code) {
            if !matches!(root.as_str(), "crate" | "self" | "super")
                && let Some(alias) = aliases.get(&root)
            {
                let mut full = alias.clone();
                full.extend(segments);
                if let Some(target) = longest_known(&known, &full)
                    && target != *module
                {
                    targets.insert(target);
                }
                continue;
            }
            let mut full: Vec<String> = match root.as_str() {
                "crate" => Vec::new(),
                "self" => here.clone(),
                "super" => here[..here.len().saturating_sub(1)].to_vec(),
                child => {
                    let mut p = here.clone();
                    p.push(child.to_owned());
                    if !known.contains(&p.join("::")) {
                        continue;
                    }
                    p
                }
            };
            let mut rest = segments.into_iter().peekable();
            // `super::super::…`
            while rest.peek().map(String::as_str) == Some("super") {
                rest.next();
                full.pop();
            }
            full.extend(rest);
            if let Some(target) = longest_known(&known, &full)
                && target != *module
            {
                targets.insert(target);
            }
        }
        edges.insert(module.clone(), targets);
    }
    edges
}

/// The longest prefix of `path` that is a module.
fn longest_known(known: &BTreeSet<String>, path: &[String]) -> Option<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|candidate| known.contains(candidate))
}

/// The strongly connected groups of more than one module (Tarjan).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.edges[v] {
            let w = w.as_str();
            if !s.edges.contains_key(w) {
                continue;
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                group.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                s.found.push(group);
            }
        }
    }
    let mut state = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

fn crate_src(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn within(edges: &BTreeMap<String, BTreeSet<String>>, prefix: &str) -> Vec<BTreeSet<String>> {
    circles(edges)
        .into_iter()
        .filter(|group| {
            group
                .iter()
                .any(|m| m == prefix || m.starts_with(&format!("{prefix}::")))
        })
        .collect()
}

#[test]
fn the_reader_sees_use_lines_groups_and_child_paths() {
    let found = paths("use crate::a::{b, c::d};\nlet x = vm::Spec::new(); // crate::ignored\n");
    assert!(found.contains(&("crate".into(), vec!["a".into(), "b".into()])));
    assert!(found.contains(&("crate".into(), vec!["a".into(), "c".into(), "d".into()])));
    assert!(found.contains(&("vm".into(), vec!["Spec".into(), "new".into()])));
    assert!(!found.iter().any(|(_, s)| s.contains(&"ignored".to_owned())));
}

#[test]
fn test_modules_go_but_other_test_items_stay() {
    let text = "use crate::a;\n#[cfg(test)]\nfn helper() {}\nfn persist() { crate::b::x(); }\n#[cfg(test)]\nmod tests {\n    use crate::c;\n    fn t() { { } }\n}\nfn after() {}\n";
    let kept = without_test_module(text);
    assert!(
        kept.contains("crate::b::x") && kept.contains("fn after"),
        "{kept}"
    );
    assert!(!kept.contains("crate::c"), "{kept}");
}

#[test]
fn a_path_through_an_imported_module_counts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\n").unwrap();
    std::fs::write(
        src.join("a/mod.rs"),
        "mod b;\nuse crate::a::b;\nfn f() { b::c::g(); }\n",
    )
    .unwrap();
    std::fs::write(src.join("a/b/mod.rs"), "mod c;\n").unwrap();
    std::fs::write(src.join("a/b/c.rs"), "fn g() { crate::a::f(); }\n").unwrap();
    let edges = graph(src);
    assert!(edges["a"].contains("a::b::c"), "{edges:?}");
    assert_eq!(within(&edges, "a").len(), 1, "{edges:?}");
}

#[test]
fn a_circle_is_found() {
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    edges.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        circles(&edges),
        vec![BTreeSet::from(["a".to_owned(), "b".to_owned()])]
    );
}

#[test]
fn the_backends_have_no_import_circle() {
    let edges = graph(&crate_src("src"));
    assert!(edges.contains_key("backend::qemu::vm"), "{edges:?}");
    assert_eq!(within(&edges, "backend"), Vec::<BTreeSet<String>>::new());
}

/// Drivers meet only in the composite: none imports another (the guest driver both hypervisor
/// backends share imports neither).
const BACKEND_CROSSINGS: [(&str, &str); 0] = [];

#[test]
fn no_driver_imports_another() {
    let edges = graph(&crate_src("src"));
    let backends = [
        "backend::sim",
        "backend::qemu",
        "backend::libvirt",
        "backend::guest",
    ];
    let mut crossings = BTreeSet::new();
    for (module, targets) in &edges {
        let Some(from) = backends
            .iter()
            .find(|b| module == *b || module.starts_with(&format!("{b}::")))
        else {
            continue;
        };
        // The hypervisor backends are built on the shared guest driver.
        let shared =
            |target: &str| target == "backend::guest" || target.starts_with("backend::guest::");
        for target in targets {
            if let Some(to) = backends
                .iter()
                .find(|b| *b != from && (target == *b || target.starts_with(&format!("{b}::"))))
                && !(shared(target) && *from != "backend::guest" && *from != "backend::sim")
            {
                crossings.insert((module.clone(), target.clone(), *to));
            }
        }
    }
    let seen: BTreeSet<(String, String)> = crossings
        .iter()
        .map(|(module, target, _)| (module.clone(), target.clone()))
        .collect();
    let known: BTreeSet<(String, String)> = BACKEND_CROSSINGS
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    assert_eq!(
        seen, known,
        "a driver imports another; what spans machines belongs in backend::composite"
    );
}

#[test]
fn meterd_has_no_import_circle() {
    let edges = graph(&crate_src("../runtime-under-test/meterd/src"));
    assert!(edges.contains_key("daemon"), "{edges:?}");
    assert!(edges["daemon"].contains("dongles"), "{edges:?}");
    assert_eq!(circles(&edges), Vec::<BTreeSet<String>>::new());
}
