//! Prometheus text exposition, read as a bench needs it: samples with their labels, the difference
//! of two scrapes, and quantile bounds from a histogram's buckets.

use std::collections::BTreeMap;

/// One scrape: `(metric name, sorted labels)` → value.
#[derive(Debug, Default, Clone)]
pub(crate) struct Scrape(BTreeMap<(String, Vec<(String, String)>), f64>);

impl Scrape {
    /// Parses the text format (comments and unparsable lines are skipped).
    pub(crate) fn parse(text: &str) -> Scrape {
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = match line.rsplit_once(' ') {
                Some((s, v)) => (s.trim(), v.trim()),
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            out.insert((name.to_owned(), labels), value);
        }
        Scrape(out)
    }

    /// Every sample of `name`, with its labels.
    pub(crate) fn samples<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.0
            .iter()
            .filter(move |((n, _), _)| n == name)
            .map(|((_, l), v)| (l.as_slice(), *v))
    }

    /// `self - before`, sample by sample (a sample missing before counts from 0).
    pub(crate) fn minus(&self, before: &Scrape) -> Scrape {
        Scrape(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0.0)))
                .collect(),
        )
    }

    /// Sum of the samples of `name` whose labels include every `(key, value)` of `with`.
    pub(crate) fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(labels, _)| has(labels, with))
            .map(|(_, v)| v)
            .sum()
    }

    /// The histogram `name` (base name, without `_bucket`) restricted to `with`.
    pub(crate) fn histogram(&self, name: &str, with: &[(&str, &str)]) -> Histogram {
        let mut buckets: Vec<(f64, f64)> = self
            .samples(&format!("{name}_bucket"))
            .filter(|(labels, _)| has(labels, with))
            .filter_map(|(labels, v)| {
                let le = label(labels, "le")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram {
            buckets,
            sum: self.sum(&format!("{name}_sum"), with),
            count: self.sum(&format!("{name}_count"), with),
        }
    }
}

/// The value of label `key`.
pub(crate) fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn has(labels: &[(String, String)], with: &[(&str, &str)]) -> bool {
    with.iter().all(|(k, v)| label(labels, k) == Some(*v))
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(e);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim().trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    out.sort();
    out
}

/// A histogram: cumulative `(upper bound, count)` buckets, sum and count.
#[derive(Debug, Default, Clone)]
pub(crate) struct Histogram {
    buckets: Vec<(f64, f64)>,
    /// Sum of the observations.
    pub(crate) sum: f64,
    /// Number of observations.
    pub(crate) count: f64,
}

impl Histogram {
    /// Mean observation; 0 when empty.
    pub(crate) fn mean(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count
        } else {
            0.0
        }
    }

    /// The largest finite bucket bound.
    pub(crate) fn largest_bound(&self) -> f64 {
        self.buckets
            .iter()
            .map(|(le, _)| *le)
            .filter(|le| le.is_finite())
            .fold(0.0, f64::max)
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1): the quantile is at most this.
    pub(crate) fn quantile_bound(&self, q: f64) -> f64 {
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want && *c > 0.0)
            .map_or(0.0, |(le, _)| *le)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_and_histograms() {
        let text = "# HELP x\n\
            apiserver_request_total{code=\"201\",group=\"edge.drone.io\",verb=\"APPLY\"} 7\n\
            h_bucket{controller=\"node\",le=\"0.001\"} 1\n\
            h_bucket{controller=\"node\",le=\"0.002\"} 3\n\
            h_bucket{controller=\"node\",le=\"+Inf\"} 4\n\
            h_sum{controller=\"node\"} 0.01\n\
            h_count{controller=\"node\"} 4\n";
        let s = Scrape::parse(text);
        assert!((s.sum("apiserver_request_total", &[("verb", "APPLY")]) - 7.0).abs() < 1e-9);
        let h = s.histogram("h", &[("controller", "node")]);
        assert!((h.quantile_bound(0.5) - 0.002).abs() < 1e-9);
        assert!(h.quantile_bound(0.95).is_infinite());
        assert!((h.mean() - 0.0025).abs() < 1e-9);
        let d = s.minus(&Scrape::parse("h_count{controller=\"node\"} 1\n"));
        assert!((d.histogram("h", &[("controller", "node")]).count - 3.0).abs() < 1e-9);
    }
}
