//! Sweep grids: a base experiment plus a cartesian grid over any settings.
//!
//! ```toml
//! base = "bnb_4bit_nf4"            # a preset (default: fp16_baseline)
//! [set]                            # fixed overrides, dotted keys
//! "eval.limit" = 2
//! [grid]                           # every combination of these values
//! "quant.block_size" = [32, 64, 128]
//! "quant.double_quant" = [true, false]
//! ```

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::experiment::Experiment;
use super::registry::Registry;

/// Sets `value` at a dotted `path` (`quant.block_size`) inside `table`.
fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts
        .pop()
        .filter(|l| !l.is_empty())
        .with_context(|| format!("empty key '{path}'"))?;
    let mut cur = table;
    for p in parts {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("'{p}' in '{path}' is not a table"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// Short, file-name-safe rendering of a grid value.
fn value_label(v: &toml::Value) -> String {
    let raw = match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Expands a grid document into experiments; `origin` names it in errors.
pub fn expand(text: &str, origin: &str, registry: &Registry) -> Result<Vec<Experiment>> {
    let doc: toml::Table =
        toml::from_str(text).with_context(|| format!("{origin}: invalid TOML"))?;
    let mut base = "fp16_baseline".to_string();
    let mut fixed = toml::Table::new();
    let mut grid = toml::Table::new();
    for (k, v) in doc {
        match (k.as_str(), v) {
            ("base", toml::Value::String(s)) => base = s,
            ("set", toml::Value::Table(t)) => fixed = t,
            ("grid", toml::Value::Table(t)) => grid = t,
            (other, _) => bail!(
                "{origin}: unknown key '{other}'; expected base = \"PRESET\", [set] and [grid]"
            ),
        }
    }
    registry
        .get(&base)
        .with_context(|| format!("{origin}: base"))?;
    let mut table = registry.tables[&base].clone();
    for (path, v) in fixed {
        set_path(&mut table, &path, v).with_context(|| format!("{origin}: [set] {path}"))?;
    }
    let axes: Vec<(String, Vec<toml::Value>)> = grid
        .into_iter()
        .map(|(k, v)| match v {
            toml::Value::Array(a) if !a.is_empty() => Ok((k, a)),
            _ => bail!("{origin}: grid key '{k}' needs a non-empty list of values"),
        })
        .collect::<Result<_>>()?;
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for (key, values) in &axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    combos
        .into_iter()
        .map(|combo| {
            let mut t = table.clone();
            let mut name = base.clone();
            for (key, v) in &combo {
                set_path(&mut t, key, v.clone())?;
                let short = key.rsplit('.').next().unwrap_or(key);
                name.push_str(&format!("__{short}={}", value_label(v)));
            }
            Experiment::from_table(&name, t).with_context(|| {
                let desc: Vec<String> = combo.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{origin}: invalid grid value ({})", desc.join(", "))
            })
        })
        .collect()
}

/// Reads and expands a grid file.
pub fn load(path: &Path, registry: &Registry) -> Result<Vec<Experiment>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read sweep grid", path.display()))?;
    expand(&text, &path.display().to_string(), registry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantSpec;

    #[test]
    fn cartesian_product_with_fixed_settings() {
        let r = Registry::builtin();
        let text = r#"
            base = "bnb_4bit_nf4"
            [set]
            "eval.limit" = 2
            [grid]
            "quant.block_size" = [32, 128]
            "quant.double_quant" = [true, false]
        "#;
        let exps = expand(text, "g.toml", &r).unwrap();
        assert_eq!(exps.len(), 4);
        assert_eq!(
            exps[0].name,
            "bnb_4bit_nf4__block_size=32__double_quant=true"
        );
        assert_eq!(
            exps[3].name,
            "bnb_4bit_nf4__block_size=128__double_quant=false"
        );
        assert!(exps.iter().all(|e| e.eval.limit == Some(2)));
        let QuantSpec::Nf4(c) = &exps[3].quant else {
            panic!()
        };
        assert_eq!((c.block_size, c.double_quant), (128, false));
    }

    #[test]
    fn invalid_grid_value_is_named() {
        let r = Registry::builtin();
        let text = "base = \"bnb_4bit_nf4\"\n[grid]\n\"quant.block_size\" = [64, 48]\n";
        let e = format!("{:#}", expand(text, "g.toml", &r).unwrap_err());
        assert!(
            e.contains("quant.block_size = 48") && e.contains("power of two"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            expand("[grid]\n\"quant.blok\" = [1]\n", "g.toml", &r).unwrap_err()
        );
        assert!(e.contains("blok"), "{e}");
        let e = format!(
            "{:#}",
            expand("base = \"nope\"\n", "g.toml", &r).unwrap_err()
        );
        assert!(e.contains("unknown experiment 'nope'"), "{e}");
    }
}
