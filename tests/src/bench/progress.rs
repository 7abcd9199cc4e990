//! Progress: one bar over the whole run with the current step as its message. When
//! stderr is not a terminal (CI logs) the bar hides itself and every step is printed as
//! a plain line instead, so a log still shows where a run was.
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} ~{eta} left\n  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Self { bar }
    }

    /// The current step.
    pub fn step(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if self.bar.is_hidden() {
            eprintln!("svclb-bench: {msg}");
        }
        self.bar.set_message(msg);
    }

    /// A line that stays above the bar (a result, a warning).
    pub fn println(&self, msg: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("svclb-bench: {}", msg.as_ref());
        } else {
            self.bar.println(msg.as_ref());
        }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Moves the bar to at least `pos` (work that was skipped still counts as done).
    pub fn at_least(&self, pos: u64) {
        if self.bar.position() < pos {
            self.bar.set_position(pos);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Leave the terminal clean even when the run ends with an error.
        self.bar.finish_and_clear();
    }
}
