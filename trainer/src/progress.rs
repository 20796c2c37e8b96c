//! Progress of a long stage: a bar on a terminal; otherwise (a log file, CI, `nohup`) a log line
//! about every 30 s with done/total, items per second and the time left, so that a log of a
//! 15-minute feature cache is not silent.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a line is logged when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

pub struct Progress {
    bar: ProgressBar,
    what: String,
    total: u64,
    start: Instant,
    /// Count and time of the last log line; `None`: a terminal, the bar says it all.
    log: Option<Mutex<(u64, Instant)>>,
    every: Duration,
}

impl Progress {
    /// A bar on a terminal, log lines every [`LOG_EVERY`] elsewhere.
    pub fn new(total: usize, what: &str) -> Self {
        Self::with_interval(total, what, (!std::io::stderr().is_terminal()).then_some(LOG_EVERY))
    }

    /// Log lines every `every` (`None`: the bar only).
    pub fn with_interval(total: usize, what: &str, every: Option<Duration>) -> Self {
        let bar = if every.is_some() { ProgressBar::hidden() } else { ProgressBar::new(total as u64) };
        bar.set_length(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>18} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        let now = Instant::now();
        Self {
            bar,
            what: what.into(),
            total: total as u64,
            start: now,
            log: every.map(|_| Mutex::new((0, now))),
            every: every.unwrap_or(LOG_EVERY),
        }
    }

    /// Counts `n` more items done; returns the line it logged, if it was time for one.
    pub fn inc(&self, n: u64) -> Option<String> {
        self.bar.inc(n);
        let log = self.log.as_ref()?;
        let mut last = log.lock().expect("progress lock");
        last.0 += n;
        if last.1.elapsed() < self.every || last.0 >= self.total {
            return None;
        }
        last.1 = Instant::now();
        let line = self.line(last.0);
        tracing::info!("{line}");
        Some(line)
    }

    /// "features train: 3200/19200 (16.7%), 35.2 img/s, 7 min 34 s left".
    pub fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        let left = if rate > 0.0 { (self.total.saturating_sub(done)) as f64 / rate } else { f64::INFINITY };
        let pct = 100.0 * done as f64 / self.total.max(1) as f64;
        format!("{}: {done}/{} ({pct:.1}%), {rate:.1} img/s, {} left", self.what, self.total, duration(left))
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// "1 h 02 min", "7 min 34 s", "12 s".
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "unknown time".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_done_total_rate_and_time_left_at_the_interval() {
        let p = Progress::with_interval(100, "features train", Some(Duration::ZERO));
        std::thread::sleep(Duration::from_millis(20));
        let line = p.inc(25).expect("a line at every call with a zero interval");
        assert!(line.starts_with("features train: 25/100 (25.0%), "), "{line}");
        assert!(line.contains(" img/s, ") && line.ends_with(" left"), "{line}");
        // The last item ends the stage: no line for it (the stage logs its own summary).
        assert_eq!(p.inc(75), None);
        let quiet = Progress::with_interval(100, "x", Some(Duration::from_secs(3600)));
        assert_eq!(quiet.inc(10), None);
        let bar = Progress::with_interval(100, "x", None);
        assert_eq!(bar.inc(10), None);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(12.2), "12 s");
        assert_eq!(duration(454.0), "7 min 34 s");
        assert_eq!(duration(3720.0), "1 h 02 min");
        assert_eq!(duration(f64::INFINITY), "unknown time");
    }
}
