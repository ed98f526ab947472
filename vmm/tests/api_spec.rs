//! `docs/api/ferry.yaml` tells the truth about the server: the same paths, methods,
//! status codes, request bodies and extension marks as `vmm::api::routes::ROUTES`.

use std::collections::BTreeSet;
use std::path::Path;

use vmm::api::routes::{Body, Method, API_PREFIX, ROUTES};
use yaml_rust2::{Yaml, YamlLoader};

fn spec() -> Yaml {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/ferry.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "one YAML document expected");
    docs.remove(0)
}

fn key(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        other => panic!("unexpected key {other:?}"),
    }
}

/// (name, method) of every operation in the spec.
fn operations(doc: &Yaml) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_hash().expect("a paths map");
    let mut ops = BTreeSet::new();
    for (p, item) in paths {
        let p = key(p);
        let name = p
            .strip_prefix('/')
            .unwrap_or_else(|| panic!("path {p:?} does not start with /"));
        for (m, _) in item.as_hash().expect("a path item map") {
            let m = key(m);
            if m.starts_with("x-") {
                continue;
            }
            ops.insert((name.to_string(), m.to_ascii_uppercase()));
        }
    }
    ops
}

#[test]
fn server_url_is_the_api_prefix() {
    let doc = spec();
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let url = doc["servers"][0]["url"].as_str().expect("servers[0].url");
    assert_eq!(
        format!("{}/", url.trim_start_matches("http://localhost")),
        API_PREFIX
    );
}

#[test]
fn every_route_is_in_the_spec_and_vice_versa() {
    let doc = spec();
    let in_spec = operations(&doc);
    let in_server: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.name.to_string(), r.method.as_str().to_string()))
        .collect();
    let missing: Vec<_> = in_server.difference(&in_spec).collect();
    let extra: Vec<_> = in_spec.difference(&in_server).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "served but not in the spec: {missing:?}; in the spec but not served: {extra:?}"
    );
}

#[test]
fn status_codes_bodies_and_extensions_match() {
    let doc = spec();
    let mut problems = Vec::new();
    for r in ROUTES {
        let item = &doc["paths"][format!("/{}", r.name).as_str()];
        let op = &item[r.method.as_str().to_ascii_lowercase().as_str()];
        let codes: BTreeSet<u16> = op["responses"]
            .as_hash()
            .unwrap_or_else(|| panic!("{}: no responses", r.name))
            .keys()
            .map(|k| key(k).parse().expect("numeric status code"))
            .collect();
        let served: BTreeSet<u16> = r.statuses.iter().copied().collect();
        if codes != served {
            problems.push(format!(
                "{}: spec lists {codes:?}, server answers {served:?}",
                r.name
            ));
        }
        let body_required = op["requestBody"]["required"].as_bool() == Some(true);
        if body_required != (r.body == Body::Json) {
            problems.push(format!(
                "{}: spec requestBody required={body_required}, server body rule {:?}",
                r.name, r.body
            ));
        }
        if r.method == Method::Get && !op["requestBody"].is_badvalue() {
            problems.push(format!("{}: a GET with a requestBody", r.name));
        }
        let ext = item["x-ferry-extension"].as_bool() == Some(true);
        if ext != r.extension {
            problems.push(format!(
                "{}: spec x-ferry-extension={ext}, route extension={}",
                r.name, r.extension
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_schema_reference_resolves() {
    let doc = spec();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/ferry.yaml"),
    )
    .unwrap();
    let mut refs = 0;
    for line in text.lines() {
        let Some(r) = line.trim().strip_prefix("$ref: ") else {
            continue;
        };
        let r = r.trim_matches('"');
        let parts: Vec<&str> = r
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("non-local $ref {r}"))
            .split('/')
            .collect();
        let mut node = &doc;
        for p in &parts {
            node = &node[*p];
        }
        assert!(!node.is_badvalue(), "$ref {r} does not resolve");
        refs += 1;
    }
    assert!(refs > 20, "only {refs} $refs found: the scan is broken");
}
