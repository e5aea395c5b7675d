//! Reference rootfs builder.
