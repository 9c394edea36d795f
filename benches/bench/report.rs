//! Medians, percentiles and the summary table printed at the end.

/// The median (the upper one for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `p` quantile (0..=1), nearest rank; NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT MET" }
}

/// Thousands separated: 12,345.
pub fn int(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// `a / b` with two decimals; "–" when it means nothing (0 / 0).
pub fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "–".into()
    }
}

/// One line of the summary: a figure for each subject (empty: not
/// measured), the ratio homicro / mosquitto and the target's verdict.
pub struct Row {
    pub item: &'static str,
    pub figure: String,
    pub homicro: String,
    pub bus: String,
    pub mosquitto: String,
    pub ratio: String,
    pub target: String,
}

#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    pub fn add(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub fn print(&mut self) {
        // By number: 10 after 9. Stable: each item's rows in their order.
        self.rows
            .sort_by_key(|r| r.item.parse::<u32>().unwrap_or(u32::MAX));
        println!(
            "\n## Summary (medians)\n\n| # | figure | homicro | bus alone | mosquitto | homicro / mosquitto | target |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.item, r.figure, r.homicro, r.bus, r.mosquitto, r.ratio, r.target
            );
        }
    }
}
