//! End-to-end tests of the signer.
