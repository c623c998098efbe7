//! The CI report's verdict as JUnit XML, the format CI systems (GitHub Actions reporters, GitLab
//! `artifacts:reports:junit`, Jenkins, Azure Pipelines) read to show test results natively: one
//! test suite, one test case per threshold check. A failed check is a `<failure>` whose message
//! has the measured value and the limit; a check the run could not or was not asked to make is
//! `<skipped>`. The schema followed is the common Ant/Surefire one (`testsuites` > `testsuite` >
//! `testcase` with `failure` or `skipped`), which all of those read.

use std::fmt::Write as _;

use serde_json::Value;

/// Escapes text for XML character data and quoted attribute values (XML 1.0 section 2.4 and
/// 3.1): the five predefined entities, and characters XML 1.0 cannot hold at all (control
/// characters other than tab, newline and carriage return) replaced by U+FFFD, since no
/// escape makes them legal.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The JUnit XML for a CI report (a shard's or a merged one).
pub fn render(report: &Value) -> String {
    let checks: Vec<&Value> = report["checks"].as_array().into_iter().flatten().collect();
    let result = |c: &Value| c["result"].as_str().unwrap_or("not checked").to_owned();
    let failures = checks.iter().filter(|c| result(c) == "fail").count();
    let skipped = checks.iter().filter(|c| !matches!(result(c).as_str(), "pass" | "fail")).count();
    let run = match &report["run_ids"] {
        Value::Array(ids) => ids.iter().map(show).collect::<Vec<_>>().join(","),
        v => show(v),
    };
    let run = if run == "none" { show(&report["run_id"]) } else { run };
    let secs = report["duration_secs"].as_f64().unwrap_or(0.0);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"fleetsim CI\" tests=\"{n}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{secs:.3}\">",
        n = checks.len()
    );
    let _ = writeln!(
        out,
        "  <testsuite name=\"fleetsim CI run {}\" tests=\"{n}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{secs:.3}\">",
        escape(&run),
        n = checks.len()
    );
    let _ = writeln!(
        out,
        "    <properties><property name=\"identities\" value=\"{}\"/><property name=\"verdict\" value=\"{}\"/></properties>",
        escape(&show(&report["identities"])),
        if report["pass"] == true { "pass" } else { "fail" }
    );
    for c in &checks {
        let name = escape(&show(&c["name"]));
        let (value, limit) = (escape(&show(&c["value"])), escape(&show(&c["limit"])));
        let _ = write!(out, "    <testcase classname=\"fleetsim.ci\" name=\"{name}\" time=\"0\">");
        match result(c).as_str() {
            // What was measured, for the CI page that shows a passed test's output.
            "pass" => {
                let _ = write!(out, "\n      <system-out>measured: {value}\nlimit: {limit}</system-out>\n    ");
            }
            "fail" => {
                let _ = write!(
                    out,
                    "\n      <failure type=\"threshold\" message=\"{name}: measured {value}, limit {limit}\">\
                     measured: {value}\nlimit: {limit}</failure>\n    "
                );
            }
            other => {
                let _ = write!(out, "\n      <skipped message=\"{}\"/>\n    ", escape(other));
            }
        }
        out.push_str("</testcase>\n");
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn xml_text_is_escaped_and_illegal_characters_replaced() {
        assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
        assert_eq!(escape("x\u{1}y\tz"), "x\u{FFFD}y\tz");
    }

    #[test]
    fn each_check_is_a_testcase_and_failures_carry_value_and_limit() {
        let r = json!({
            "pass": false, "run_id": "r<1>", "duration_secs": 2.5, "identities": 5,
            "checks": [
                {"name": "lost", "value": 3, "limit": 0, "result": "fail"},
                {"name": "stuck", "value": 0, "limit": 0, "result": "pass"},
                {"name": "method_p99_ms", "value": null, "limit": null, "result": "not checked"},
            ],
        });
        let x = render(&r);
        assert!(x.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""), "{x}");
        assert!(x.contains("message=\"lost: measured 3, limit 0\""), "{x}");
        assert!(x.contains("name=\"fleetsim CI run r&lt;1&gt;\""), "{x}");
        assert_eq!(x.matches("<testcase ").count(), 3);
        assert!(x.contains("<system-out>measured: 0\nlimit: 0</system-out>"), "{x}");
    }
}
