//! Statistics over the runs and the final results table (median and min..max of every figure, with its target).

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use crate::opts::Opts;

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

#[derive(Clone, Copy)]
pub enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
}

struct Metric {
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    target: Target,
    values: Vec<f64>,
}

#[derive(Default)]
pub struct Results {
    metrics: Vec<Metric>,
    notes: Vec<String>,
}

impl Results {
    pub fn record(&mut self, scenario: &'static str, name: &'static str, unit: &'static str, target: Target, v: f64) {
        println!("    {scenario} / {name}: {} {unit}", fmt_num(v));
        match self.metrics.iter_mut().find(|m| m.scenario == scenario && m.name == name) {
            Some(m) => m.values.push(v),
            None => self.metrics.push(Metric { scenario, name, unit, target, values: vec![v] }),
        }
    }

    pub fn note(&mut self, s: String) {
        println!("    note: {s}");
        self.notes.push(s);
    }

    pub fn print_table(&self, o: &Opts) {
        println!();
        println!("## Results: median and spread (min..max) over the runs of each figure");
        println!();
        println!("| scenario | figure | median | min..max | runs | target | met |");
        println!("|---|---|---|---|---|---|---|");
        for m in &self.metrics {
            let v = sorted(m.values.clone());
            let median = percentile(&v, 50.0);
            let (target, met) = match m.target {
                Target::None => (String::new(), String::new()),
                Target::AtLeast(t) => (format!(">= {}", fmt_num(t)), yes_no(median >= t)),
                Target::AtMost(t) => (format!("<= {}", fmt_num(t)), yes_no(median <= t)),
            };
            println!(
                "| {} | {} ({}) | {} | {}..{} | {} | {} | {} |",
                m.scenario,
                m.name,
                m.unit,
                fmt_num(median),
                fmt_num(v[0]),
                fmt_num(v[v.len() - 1]),
                v.len(),
                target,
                met
            );
        }
        if self.metrics.iter().any(|m| m.values.len() < o.runs) {
            println!();
            println!("(a figure with fewer runs than --runs {} had failed runs; see the notes)", o.runs);
        }
        if !self.notes.is_empty() {
            println!();
            println!("Notes:");
            for n in &self.notes {
                println!("- {n}");
            }
        }
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "NO" }.to_string()
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn to_utc(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}
