//! The CI report as one self-contained HTML page: the verdict, every threshold check with its
//! value and limit, timeline charts (connected identities, message rates, PUBACK latency
//! percentiles, faults injected, reconnects) and the top errors. uPlot's script and style and the
//! timeline data are inlined, so the file opens anywhere without network. Built from the JSON
//! report alone, so `fleetsim report merge` renders a merged report the same way.
//!
//! Everything that comes from input (device ids, error texts, check names, run ids) is escaped
//! for where it goes: HTML text and attributes by `escape`, and the inlined JSON by
//! `script_json`, so no value can close the `<script>` element it sits in.

use std::fmt::Write as _;

use serde_json::Value;

const UPLOT_JS: &str = include_str!("../../assets/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/vendor/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../assets/vendor/uplot/LICENSE");
const REPORT_JS: &str = include_str!("../../assets/report/report.js");
const REPORT_CSS: &str = include_str!("../../assets/report/report.css");

/// Escapes text for HTML element content and quoted attribute values (HTML Living Standard,
/// 13.1.2.6 "Restrictions on the contents of raw text and escapable raw text elements" and
/// 13.1.2.3 attributes): `&`, `<`, `>`, `"` and `'` as character references.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON to inline in a `<script type="application/json">` element. The content of a script
/// element ends at the first `</script` whatever the JavaScript or JSON around it, and `<!--`
/// changes how it is parsed (HTML Living Standard 4.12.1.3, "Restrictions for contents of script
/// elements"), so `<`, `>` and `&` are written as `\u003c`, `\u003e`, `\u0026`: the same JSON
/// value, with no markup in it. U+2028 and U+2029 too, which older JavaScript took for line ends.
pub fn script_json(v: &Value) -> String {
    let text = v.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            // Outside strings JSON has none of these, so escaping every one keeps the value.
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// A report value for a table cell: numbers rounded for reading, text as is (escaped by the
/// caller), `null` as a dash.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (_, Some(i), _) => i.to_string(),
            (_, _, Some(f)) => {
                let s = format!("{f:.3}");
                s.trim_end_matches('0').trim_end_matches('.').to_owned()
            }
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cell(v: &Value) -> String {
    escape(&show(v))
}

/// A table of `key: value` rows from a JSON object (counts by reason, cause or kind).
fn counts_table(out: &mut String, title: &str, v: &Value) {
    let Some(map) = v.as_object().filter(|m| !m.is_empty()) else { return };
    let _ = write!(out, "<table class=\"counts\"><caption>{}</caption>", escape(title));
    for (k, n) in map {
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(k), cell(n));
    }
    out.push_str("</table>");
}

/// The whole page for a CI report (a shard's or a merged one).
pub fn render(report: &Value) -> String {
    let pass = report["pass"] == true;
    let verdict = if pass { "PASS" } else { "FAIL" };
    let run = match &report["run_ids"] {
        Value::Array(ids) => ids.iter().map(show).collect::<Vec<_>>().join(", "),
        _ => show(&report["run_id"]),
    };
    let mut out = String::with_capacity(UPLOT_JS.len() + 64 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>fleetsim CI report: {verdict}</title><style>{UPLOT_CSS}</style><style>{REPORT_CSS}</style></head>\n<body>\n"
    );
    let _ = writeln!(
        out,
        "<header class=\"{cls}\"><h1>fleetsim CI report: <span id=\"verdict\">{verdict}</span></h1>\
         <p>run {run} · {dur} s · {ids} identities, {conn} connected at the end{shards}</p></header>",
        cls = if pass { "pass" } else { "fail" },
        run = escape(&run),
        dur = cell(&report["duration_secs"]),
        ids = cell(&report["identities"]),
        conn = cell(&report["connected_at_end"]),
        shards = match report["shards"].as_u64() {
            Some(n) => format!(" · merged from {n} shards ({} passed)", cell(&report["shards_passed"])),
            None => String::new(),
        },
    );

    out.push_str("<section><h2>Thresholds</h2><table id=\"checks\"><tr><th>check</th><th>value</th><th>limit</th><th>result</th></tr>");
    for c in report["checks"].as_array().into_iter().flatten() {
        let result = c["result"].as_str().unwrap_or("not checked");
        let cls = match result {
            "pass" => "pass",
            "fail" => "fail",
            _ => "skip",
        };
        let _ = write!(
            out,
            "<tr class=\"{cls}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            cell(&c["name"]),
            cell(&c["value"]),
            cell(&c["limit"]),
            escape(result)
        );
    }
    out.push_str("</table></section>\n");

    out.push_str(
        "<section><h2>Timeline</h2><p class=\"note\">Seconds since the run started. Rates are each \
         interval's count over its length; PUBACK percentiles are the upper bounds of the latency \
         histogram's buckets for the messages acknowledged in the interval; connected is the lowest \
         sample of the interval. The dashed line is where the run's time was up and the settle period \
         began (faults lifted, no more readings); the timeline ends when the devices are stopped.</p><div id=\"charts\"></div><ul id=\"render-check\"></ul></section>\n",
    );

    out.push_str("<section><h2>Top errors</h2>");
    match report["errors"].as_array().filter(|e| !e.is_empty()) {
        None => out.push_str("<p id=\"no-errors\">None.</p>"),
        Some(errors) => {
            out.push_str("<table id=\"errors\"><tr><th>count</th><th>source</th><th>kind</th><th>first seen</th></tr>");
            for e in errors {
                let mut first = show(&e["example"]);
                if let Some(d) = e["device"].as_str() {
                    first = format!("{d}: {first}");
                }
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"example\">{}</td></tr>",
                    cell(&e["count"]),
                    cell(&e["source"]),
                    cell(&e["kind"]),
                    escape(&first)
                );
            }
            out.push_str("</table>");
        }
    }
    out.push_str("</section>\n<section><h2>Counts</h2><div class=\"tables\">");
    let t = &report["telemetry"];
    let telemetry = serde_json::json!({
        "generated": t["generated"], "acked": t["acked"], "sent": t["sent"], "retransmits": t["retransmits"],
        "queued": t["queued"], "lost": t["lost"],
    });
    counts_table(&mut out, "telemetry", &telemetry);
    counts_table(&mut out, "dropped, by reason", &t["dropped"]);
    counts_table(&mut out, "reconnects, by cause", &report["reconnects"]);
    counts_table(&mut out, "hub faults", &report["hub_faults"]);
    let e = &report["end_to_end"];
    if e.is_object() {
        let (enq, read) = (&e["latency_ms"]["enqueued"], &e["latency_ms"]["read"]);
        let e2e = serde_json::json!({
            "unique": e["unique"], "duplicates": e["duplicates"], "gaps": e["gaps"], "missing": e["missing"],
            "enqueued p50 ms": enq["p50"], "enqueued p99 ms": enq["p99"],
            "read p50 ms": read["p50"], "read p99 ms": read["p99"], "read max ms": read["max"],
        });
        counts_table(&mut out, "end to end (back-end reader)", &e2e);
    }
    out.push_str("</div></section>\n");

    // The data, then uPlot (its licence kept with it), then the charts.
    let _ = write!(
        out,
        "<script type=\"application/json\" id=\"timeline\">{}</script>\n<script>/*\n{}*/\n{}</script>\n<script>{}</script>\n</body></html>\n",
        script_json(&report["timeline"]),
        UPLOT_LICENSE.replace("*/", "* /"),
        UPLOT_JS,
        REPORT_JS
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_and_attributes_are_escaped() {
        assert_eq!(escape(r#"<a href="x">&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;");
        assert_eq!(escape("plain-id_1"), "plain-id_1");
    }

    #[test]
    fn inlined_json_cannot_close_its_script_and_reads_back_the_same() {
        let v = json!({"id": "</script><script>alert(1)</script><!--", "n": 1, "s": "a\u{2028}b & c"});
        let s = script_json(&v);
        assert!(!s.contains('<') && !s.contains('>') && !s.contains('&'), "{s}");
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn a_hostile_report_stays_text() {
        let evil = "</script><script>document.title='owned'</script><img src=x onerror=alert(1)>";
        let report = json!({
            "pass": false,
            "run_id": evil,
            "checks": [{"name": evil, "value": evil, "limit": 1, "result": "fail"}],
            "errors": [{"source": "connect", "kind": evil, "count": 3, "example": evil, "device": evil}],
            "reconnects": {evil: 1},
            "timeline": {"t": [0], "note": evil},
        });
        let page = render(&report);
        // The only script elements are the page's own three.
        assert_eq!(page.matches("<script").count(), 3);
        assert_eq!(page.matches("</script>").count(), 3);
        assert!(!page.contains("<img"), "no markup from the report");
        assert!(page.contains("&lt;/script&gt;&lt;script&gt;document.title=&#39;owned&#39;"));
    }

    #[test]
    fn the_inlined_assets_cannot_end_their_elements_early() {
        // A new uPlot version holding one of these would break the page; this says so.
        for (name, text) in [("uPlot.iife.min.js", UPLOT_JS), ("report.js", REPORT_JS), ("LICENSE", UPLOT_LICENSE)] {
            let lower = text.to_ascii_lowercase();
            assert!(!lower.contains("</script") && !lower.contains("<!--"), "{name}");
        }
        for (name, text) in [("uPlot.min.css", UPLOT_CSS), ("report.css", REPORT_CSS)] {
            assert!(!text.to_ascii_lowercase().contains("</style"), "{name}");
        }
    }

    #[test]
    fn values_read_well() {
        assert_eq!(show(&json!(0.25)), "0.25");
        assert_eq!(show(&json!(2.0)), "2");
        assert_eq!(show(&json!(12)), "12");
        assert_eq!(show(&Value::Null), "—");
    }
}
