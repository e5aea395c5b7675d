//! The prepare shape the emulator answers in (wit/protocol.md §2.4), chosen
//! per stack and per request: shared by the emulator's router and the
//! platform handlers.

/// Which shape prepare answers in (wit/protocol.md §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareShape {
    /// `snapshotUri` + an `upload` block presigned by the platform.
    Legacy,
    /// `snapshotRelPath` only: the client asks the dataplane to sign.
    New,
    /// Both fields; `snapshotUri` is deliberately stale (the signed uri must win).
    Both,
}

impl PrepareShape {
    /// Parses `legacy`, `new` or `both`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "legacy" => Ok(PrepareShape::Legacy),
            "new" => Ok(PrepareShape::New),
            "both" => Ok(PrepareShape::Both),
            other => Err(format!("prepare shape '{other}' is not legacy, new or both")),
        }
    }
}

/// Header that picks the prepare shape of one request.
pub const SHAPE_HEADER: &str = "x-snapsign-prepare-shape";
