//! Local sandboxes.
