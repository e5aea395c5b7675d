//! The build client's decisions (wit/protocol.md §0, §2, §5), free of I/O:
//! the flow's step machine and the rules it applies (Dockerfile planning,
//! lookup, sizing, the spec splices, the completion rules, the builder
//! invocation, diagnostics). The builder component is the shell that
//! performs the calls the flow asks for. Two rules here serve the host's
//! `proxy` backend instead, which reads the platform's answers for the
//! flow: [`transient`] (which answers are worth retrying, §5.1) and
//! [`sandbox_info`] (a lifecycle answer's status).

pub mod call;
pub mod command;
pub mod complete;
pub mod context;
pub mod diagnose;
pub mod dockerfile;
pub mod flow;
pub mod lookup;
pub mod plan;
pub mod routes;
pub mod sandbox_info;
pub mod sizing;
pub mod splice;
pub mod transient;

pub use call::{Answer, BuildError, Call, Event, Request};
pub use flow::{Flow, Next, Step};

/// Decorates a failure after the builder sandbox exists (wit/protocol.md §5.9).
pub fn decorate(message: &str, sandbox_id: &str, build_id: &str) -> String {
    format!("{message} (builder sandbox: {sandbox_id}, build: {build_id})")
}

#[cfg(test)]
mod tests {
    #[test]
    fn decoration_names_sandbox_and_build() {
        assert_eq!(
            super::decorate("boom", "rtmmkcw33uvsbep6hn03u", "sandbox_template_build_123"),
            "boom (builder sandbox: rtmmkcw33uvsbep6hn03u, build: sandbox_template_build_123)"
        );
    }
}
