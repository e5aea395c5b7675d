//! How a build's events reach the user: live bars on a terminal, plain
//! lines elsewhere, NDJSON with `--json`.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::image_build::{BuildEvent, EventFn};

/// Upload progress is reported every this many bytes (and once at the end).
const UPLOAD_REPORT_EVERY: u64 = 8 << 20;

/// Whether an upload event is worth reporting: the last one, or
/// [`UPLOAD_REPORT_EVERY`] bytes after the last reported.
fn upload_worth_reporting(last: &Mutex<u64>, sent: u64, total: u64) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    if total == 0 && sent < *last + UPLOAD_REPORT_EVERY {
        return false;
    }
    *last = sent;
    true
}

/// A build event as one JSON object (`--json`'s NDJSON lines), tagged by `event`.
pub fn event_json(event: &BuildEvent) -> serde_json::Value {
    use serde_json::json;
    {
        match event {
            BuildEvent::Stage(stage) => json!({"event": "stage", "stage": stage}),
            BuildEvent::Upload(sent, total) => {
                json!({"event": "upload", "sentBytes": sent, "totalBytes": (*total > 0).then_some(*total)})
            }
            BuildEvent::Log(stream, line) => json!({"event": "log", "stream": stream, "line": line}),
            BuildEvent::Warning(message) => json!({"event": "warning", "message": message}),
            BuildEvent::Metadata(text) => {
                let metadata = serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()));
                json!({"event": "metadata", "metadata": metadata})
            }
        }
    }
}

/// Where a build's progress goes on stderr: live bars when stderr is a
/// terminal (not `TERM=dumb`), plain lines otherwise (a pipe, a file, CI),
/// so logs never hold escape codes.
pub fn progress_printer() -> EventFn {
    let terminal = std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |term| term != "dumb");
    if terminal { live_printer() } else { plain_printer() }
}

/// Stages, builder log lines, upload progress every 8 MiB, warnings: one line each.
fn plain_printer() -> EventFn {
    let last = Mutex::new(0u64);
    Arc::new(move |event| match event {
        BuildEvent::Stage(stage) => eprintln!("==> {stage}"),
        BuildEvent::Log(stream, line) => eprintln!("  [builder {stream}] {line}"),
        BuildEvent::Warning(warning) => eprintln!("warning: {warning}"),
        BuildEvent::Upload(sent, total) if upload_worth_reporting(&last, sent, total) => {
            if total > 0 {
                eprintln!("  context uploaded: {total} bytes");
            } else {
                eprintln!("  context upload: {:.1} MiB sent", sent as f64 / 1048576.0);
            }
        }
        BuildEvent::Upload(..) => {}
        // The platform's answer to completion names what was registered.
        BuildEvent::Metadata(_) => {}
    })
}

/// The live view: stage, log and warning lines scroll above a spinner that
/// names the stage and its time, and, while the context goes up, a bar with
/// the bytes sent and the rate (the total is known only at the end).
struct Live {
    bars: MultiProgress,
    stage: ProgressBar,
    upload: Mutex<Option<ProgressBar>>,
}

impl Live {
    fn new() -> Self {
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let stage = bars.add(ProgressBar::new_spinner());
        stage.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("a valid template"));
        stage.enable_steady_tick(Duration::from_millis(120));
        Live { bars, stage, upload: Mutex::new(None) }
    }

    fn line(&self, text: String) {
        // Written above the bars; plain lines if the terminal went away.
        if self.bars.println(&text).is_err() {
            eprintln!("{text}");
        }
    }

    fn show(&self, event: BuildEvent) {
        match event {
            BuildEvent::Stage(stage) => {
                self.line(format!("==> {stage}"));
                self.stage.set_message(stage);
                self.stage.reset_elapsed();
            }
            BuildEvent::Log(stream, line) => self.line(format!("  [builder {stream}] {line}")),
            BuildEvent::Warning(warning) => self.line(format!("warning: {warning}")),
            BuildEvent::Upload(sent, total) => {
                let mut upload = self.upload.lock().unwrap_or_else(|p| p.into_inner());
                let bar = upload.get_or_insert_with(|| {
                    let bar = self.bars.add(ProgressBar::no_length());
                    let style = "  context {bytes} sent, {binary_bytes_per_sec} ({elapsed})";
                    bar.set_style(ProgressStyle::with_template(style).expect("a valid template"));
                    bar
                });
                bar.set_position(sent);
                if total > 0 {
                    bar.finish_and_clear();
                    self.bars.remove(bar);
                    *upload = None;
                    self.line(format!("  context uploaded: {total} bytes"));
                }
            }
            BuildEvent::Metadata(_) => {}
        }
    }
}

impl Drop for Live {
    /// The build is over: no spinner is left on the screen.
    fn drop(&mut self) {
        if let Some(upload) = self.upload.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            upload.finish_and_clear();
        }
        self.stage.finish_and_clear();
    }
}

fn live_printer() -> EventFn {
    let live = Live::new();
    Arc::new(move |event| live.show(event))
}

/// Prints every event to stdout as one JSON object a line (NDJSON; upload
/// progress every 8 MiB and at the end), for hosts that follow a build; the
/// caller prints the last line, the result.
pub fn json_printer() -> EventFn {
    let last = Mutex::new(0u64);
    Arc::new(move |event| {
        if let BuildEvent::Upload(sent, total) = event
            && !upload_worth_reporting(&last, sent, total)
        {
            return;
        }
        print_json_line(&event_json(&event));
    })
}

/// Writes `value` to stdout as one line, at once (a follower reads it as it comes).
pub fn print_json_line(value: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}").and_then(|()| out.flush());
}
