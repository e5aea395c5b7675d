//! End-to-end tests of the reference rootfs builder against the embedded store.
