//! Helpers for the system tests live in the test files themselves.
