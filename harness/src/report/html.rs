//! report.html: a self-contained page of a run (inline CSS and SVG, no script, no network): the
//! verdicts, and per scenario a timeline (a lane per machine shaded by its power state, one for
//! world-wide steps, one per product with its grants and denials, one for checks), links to each
//! machine's logs, and a table of what each step and check did.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Event, StepAnswer, Verdict, scenario_results};

/// Width of a timeline's drawing area, in SVG units.
const TIMELINE_WIDTH: f64 = 900.0;
/// Left margin of a timeline, where the lane names go.
const LANE_LABEL_WIDTH: f64 = 110.0;
/// Height of one lane.
const LANE_HEIGHT: f64 = 22.0;

/// Renders the HTML report of a run; `logs` is the run's log folder, relative to the page.
pub fn report_html(run_id: &str, events: &[Event], logs: &str) -> String {
    let results = scenario_results(events);
    let overall = results
        .iter()
        .fold(Verdict::Pass, |acc, r| acc.worst(r.verdict));
    let backend = events.iter().find_map(|e| match e {
        Event::RunStarted { backend, .. } => Some(backend.as_str()),
        _ => None,
    });
    let passed = results
        .iter()
        .filter(|r| r.verdict == Verdict::Pass)
        .count();
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Vigil run {run}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n\
         <h1>Vigil run {run} <span class=\"verdict {class}\">{label}</span></h1>\n\
         <p>{passed} of {total} scenarios passed on the {backend} backend. Machine logs: \
         <a href=\"{logs}/\">{logs}/</a>.</p>\n",
        run = escape(run_id),
        class = css_class(overall),
        label = overall.label(),
        total = results.len(),
        backend = escape(backend.unwrap_or("unknown")),
        logs = escape(logs),
    );
    out.push_str(
        "<table>\n<tr><th>scenario</th><th>verdict</th><th>assertions</th><th>failed</th>\
         <th>duration</th></tr>\n",
    );
    for r in &results {
        let _ = writeln!(
            out,
            "<tr><td><a href=\"#{anchor}\">{name}</a></td><td class=\"{class}\">{label}</td>\
             <td class=\"num\">{assertions}</td><td class=\"num\">{failed}</td>\
             <td class=\"num\">{secs:.2} s</td></tr>",
            anchor = anchor(&r.name),
            name = escape(&r.name),
            class = css_class(r.verdict),
            label = r.verdict.label(),
            assertions = r.assertions,
            failed = r.failed,
            secs = r.elapsed_ms / 1000.0,
        );
    }
    out.push_str("</table>\n");
    for r in &results {
        let marks = marks_of(events, &r.name);
        let _ = writeln!(
            out,
            "<section id=\"{anchor}\">\n<h2>{name} <span class=\"verdict {class}\">{label}</span></h2>",
            anchor = anchor(&r.name),
            name = escape(&r.name),
            class = css_class(r.verdict),
            label = r.verdict.label(),
        );
        if let Some(error) = &r.error {
            let _ = writeln!(out, "<p class=\"error\">{}</p>", escape(error));
        }
        out.push_str(&timeline_svg(&marks));
        out.push_str(&log_links(&marks, logs, &r.name));
        out.push_str(&marks_table(&marks));
        out.push_str(&super::usage_html::usage_tables(events, &r.name));
        out.push_str("</section>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// One step or check of a scenario, placed in time.
struct Mark<'a> {
    index: usize,
    line: usize,
    check: bool,
    /// The machines a step acted on (none for checks and world-wide steps).
    machines: &'a [String],
    /// What the runtime answered the app, access or activation the step started.
    answers: &'a [StepAnswer],
    /// Every machine's power state after the step (empty for checks).
    power: Option<&'a BTreeMap<String, String>>,
    /// How many of the scenario's apps hold each product after the step (none for checks).
    holding: Option<&'a BTreeMap<u32, u32>>,
    summary: &'a str,
    start_ms: f64,
    elapsed_ms: f64,
    verdict: Verdict,
    detail: Option<String>,
}

/// The steps and checks of a scenario in order, each starting where the one before ended.
fn marks_of<'a>(events: &'a [Event], scenario: &str) -> Vec<Mark<'a>> {
    let mut at = 0.0;
    let mut marks = Vec::new();
    for event in events {
        let mark = match event {
            Event::Step {
                scenario: s,
                index,
                line,
                summary,
                machines,
                answers,
                holding,
                power,
                elapsed_ms,
                verdict,
                message,
            } if s == scenario => Mark {
                index: *index,
                line: *line,
                check: false,
                machines,
                answers,
                power: Some(power),
                holding: Some(holding),
                summary,
                start_ms: at,
                elapsed_ms: *elapsed_ms,
                verdict: *verdict,
                detail: message.clone(),
            },
            Event::Assertion {
                scenario: s,
                index,
                line,
                summary,
                expected,
                actual,
                verdict,
                elapsed_ms,
            } if s == scenario => Mark {
                index: *index,
                line: *line,
                check: true,
                machines: &[],
                answers: &[],
                power: None,
                holding: None,
                summary,
                start_ms: at,
                elapsed_ms: *elapsed_ms,
                verdict: *verdict,
                detail: (*verdict != Verdict::Pass)
                    .then(|| format!("expected {expected}, got {actual}")),
            },
            _ => continue,
        };
        at += mark.elapsed_ms.max(0.0);
        marks.push(mark);
    }
    marks
}

/// Where a mark is drawn: the lanes of its machines, else the world lane, or the checks lane.
fn lanes_of<'a>(mark: &Mark<'a>) -> Vec<&'a str> {
    if mark.check {
        vec![CHECKS]
    } else if mark.machines.is_empty() {
        vec![WORLD]
    } else {
        mark.machines.iter().map(String::as_str).collect()
    }
}

/// The lane of world-wide steps (`advance`, `wait`, and steps naming no machine).
const WORLD: &str = "world";
/// The lane of checks (`expect`).
const CHECKS: &str = "checks";

/// The lane of a product's grants and denials.
fn product_lane(product: u32) -> String {
    format!("product {product}")
}

/// The machines a scenario acts on, in the order it first does.
fn machines_in<'a>(marks: &[Mark<'a>]) -> Vec<&'a str> {
    let mut machines: Vec<&str> = Vec::new();
    for mark in marks.iter().filter(|m| !m.check) {
        for machine in mark.machines {
            if !machines.contains(&machine.as_str()) {
                machines.push(machine);
            }
        }
    }
    machines
}

/// One lane per machine (in the order the scenario first acts on them, shaded by its power
/// state), then world-wide steps, one lane per product (a dot per grant, a cross per denial),
/// then checks, on one time axis; each mark a bar (at least a tick wide) whose tooltip names it.
fn timeline_svg(marks: &[Mark<'_>]) -> String {
    let machines = machines_in(marks);
    let mut lanes: Vec<String> = machines.iter().map(|m| (*m).to_owned()).collect();
    if marks.iter().any(|m| !m.check && m.machines.is_empty()) {
        lanes.push(WORLD.to_owned());
    }
    let mut products: Vec<u32> = marks
        .iter()
        .flat_map(|m| {
            m.answers
                .iter()
                .map(|a| a.product)
                .chain(m.holding.into_iter().flat_map(|h| h.keys().copied()))
        })
        .collect();
    products.sort_unstable();
    products.dedup();
    lanes.extend(products.iter().map(|p| product_lane(*p)));
    lanes.push(CHECKS.to_owned());
    let row_of = |lane: &str| lanes.iter().position(|l| l == lane).unwrap_or(0) as f64;
    let total_ms = marks
        .iter()
        .map(|m| m.start_ms + m.elapsed_ms.max(0.0))
        .fold(0.0, f64::max)
        .max(1.0);
    let scale = TIMELINE_WIDTH / total_ms;
    let axis_y = LANE_HEIGHT * lanes.len() as f64;
    let height = axis_y + 24.0;
    let width = LANE_LABEL_WIDTH + TIMELINE_WIDTH + 10.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg class=\"timeline\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" \
         role=\"img\" aria-label=\"timeline of steps by machine, and checks\">"
    );
    for (lane, name) in lanes.iter().enumerate() {
        let y = lane as f64 * LANE_HEIGHT;
        let _ = writeln!(
            svg,
            "<text x=\"0\" y=\"{:.1}\" class=\"lane\">{}</text>\
             <line x1=\"{LANE_LABEL_WIDTH}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" class=\"rule\"/>",
            y + 15.0,
            escape(name),
            y + LANE_HEIGHT - 2.0,
            LANE_LABEL_WIDTH + TIMELINE_WIDTH,
            y + LANE_HEIGHT - 2.0,
        );
    }
    // Power states: each machine's state after a step shades its lane until the next step.
    let mut state: BTreeMap<&str, &str> = BTreeMap::new();
    for mark in marks {
        let x = LANE_LABEL_WIDTH + mark.start_ms * scale;
        let w = (mark.elapsed_ms.max(0.0) * scale).max(0.5);
        for machine in &machines {
            let Some(power) = state.get(machine) else {
                continue;
            };
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" class=\"power-{}\">\
                 <title>{} {}</title></rect>",
                row_of(machine) * LANE_HEIGHT + 1.0,
                LANE_HEIGHT - 4.0,
                power_class(power),
                escape(machine),
                escape(power),
            );
        }
        if let Some(power) = mark.power {
            for (machine, power) in power {
                state.insert(machine.as_str(), power.as_str());
            }
        }
    }
    for product in &products {
        svg.push_str(&holding_line(
            marks,
            *product,
            row_of(&product_lane(*product)),
            scale,
        ));
    }
    for mark in marks {
        let x = LANE_LABEL_WIDTH + mark.start_ms * scale;
        let w = (mark.elapsed_ms.max(0.0) * scale).max(2.0);
        for answer in mark.answers {
            let cx = x + w;
            let cy = row_of(&product_lane(answer.product)) * LANE_HEIGHT + LANE_HEIGHT / 2.0 - 1.0;
            let what = match &answer.reason {
                None => format!("{} granted", answer.name),
                Some(reason) => format!("{} denied ({reason})", answer.name),
            };
            let shape = if answer.granted {
                format!("<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"5\" class=\"granted\">")
            } else {
                format!(
                    "<path d=\"M{:.1} {:.1} l10 10 m0 -10 l-10 10\" class=\"denied\">",
                    cx - 5.0,
                    cy - 5.0
                )
            };
            let end = if answer.granted {
                "</circle>"
            } else {
                "</path>"
            };
            let _ = writeln!(
                svg,
                "{shape}<title>{} line {}: {}</title>{end}",
                mark.index,
                mark.line,
                escape(&what)
            );
        }
        for lane in lanes_of(mark) {
            let row = row_of(lane);
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" class=\"{}\">\
                 <title>{} line {}: {} ({:.1} ms, {})</title></rect>",
                row * LANE_HEIGHT + 3.0,
                LANE_HEIGHT - 8.0,
                css_class(mark.verdict),
                mark.index,
                mark.line,
                escape(mark.summary),
                mark.elapsed_ms,
                mark.verdict.label(),
            );
        }
    }
    for quarter in 0..=4 {
        let ms = total_ms * f64::from(quarter) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\">{:.2} s</text>",
            LANE_LABEL_WIDTH + ms * scale - if quarter == 4 { 40.0 } else { 0.0 },
            axis_y + 16.0,
            ms / 1000.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A step line of how many apps hold `product` over time, in its lane (`row`), with the count
/// written where it changes.
fn holding_line(marks: &[Mark<'_>], product: u32, row: f64, scale: f64) -> String {
    let peak = marks
        .iter()
        .filter_map(|m| m.holding.and_then(|h| h.get(&product)))
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let bottom = row * LANE_HEIGHT + LANE_HEIGHT - 3.0;
    let y = |count: u32| bottom - f64::from(count) * (LANE_HEIGHT - 8.0) / f64::from(peak);
    let mut count = 0;
    let mut points = vec![format!("{LANE_LABEL_WIDTH:.1},{:.1}", y(0))];
    let mut labels = String::new();
    for mark in marks {
        let Some(now) = mark.holding.map(|h| h.get(&product).copied().unwrap_or(0)) else {
            continue;
        };
        if now != count {
            let x = LANE_LABEL_WIDTH + (mark.start_ms + mark.elapsed_ms.max(0.0)) * scale;
            points.push(format!("{x:.1},{:.1}", y(count)));
            points.push(format!("{x:.1},{:.1}", y(now)));
            let _ = write!(
                labels,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"count\">{now}</text>",
                x + 2.0,
                y(now) - 1.0
            );
            count = now;
        }
    }
    points.push(format!(
        "{:.1},{:.1}",
        LANE_LABEL_WIDTH + TIMELINE_WIDTH,
        y(count)
    ));
    format!(
        "<polyline points=\"{}\" class=\"holding\"><title>apps holding product {product}</title></polyline>{labels}\n",
        points.join(" ")
    )
}

/// The CSS class of a power state's shading.
fn power_class(power: &str) -> &'static str {
    match power {
        "running" => "running",
        "paused" => "paused",
        _ => "off",
    }
}

/// Links to the log folder of every machine the scenario acted on.
fn log_links(marks: &[Mark<'_>], logs: &str, scenario: &str) -> String {
    let machines = machines_in(marks);
    if machines.is_empty() {
        return String::new();
    }
    let links: Vec<String> = machines
        .iter()
        .map(|m| {
            format!(
                "<a href=\"{logs}/{scenario}/{machine}/\">{machine}</a>",
                logs = escape(logs),
                scenario = escape(scenario),
                machine = escape(m)
            )
        })
        .collect();
    format!("<p class=\"logs\">Logs: {}</p>\n", links.join(" · "))
}

/// The steps and checks of a scenario as a table, with what went wrong.
fn marks_table(marks: &[Mark<'_>]) -> String {
    let mut out = String::from(
        "<table>\n<tr><th>#</th><th>line</th><th>what</th><th>time</th><th>verdict</th>\
         <th>detail</th></tr>\n",
    );
    for mark in marks {
        let _ = writeln!(
            out,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}{}</td>\
             <td class=\"num\">{:.1} ms</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            mark.index,
            mark.line,
            if mark.check { "expect " } else { "" },
            escape(mark.summary),
            mark.elapsed_ms,
            css_class(mark.verdict),
            mark.verdict.label(),
            escape(mark.detail.as_deref().unwrap_or("")),
        );
    }
    out.push_str("</table>\n");
    out
}

fn css_class(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Error => "error",
    }
}

/// An id for a scenario's section: its name with anything but letters, digits and `-` as `-`.
fn anchor(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("scenario-{safe}")
}

/// Text made safe for HTML content and attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; }
.pass { color: #1b5e20; fill: #2e7d32; }
.fail { color: #b71c1c; fill: #c62828; }
.error { color: #4a148c; fill: #6a1b9a; }
.verdict { font-size: 0.7em; border: 1px solid currentColor; padding: 0.1em 0.4em; }
svg.timeline text { font-size: 11px; fill: #555; }
svg.timeline .rule { stroke: #ddd; }
svg.timeline .power-running { fill: #e3f2e3; }
svg.timeline .power-paused { fill: #fff1bf; }
svg.timeline .power-off { fill: #eeeeee; }
svg.timeline .granted { fill: #2e7d32; }
svg.timeline .holding { fill: none; stroke: #1565c0; stroke-width: 1.5; }
svg.timeline text.count { font-size: 9px; fill: #1565c0; }
svg.timeline .denied { stroke: #c62828; stroke-width: 2.5; fill: none; }
section { margin-top: 2em; }
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_anchors_are_safe() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(anchor("my scenario/1"), "scenario-my-scenario-1");
    }
}
