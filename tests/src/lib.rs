//! The system tests (tests/*.rs) start the three real Conduit binaries as separate
//! processes, each stack with its own AMQP namespace, database and video folder, and
//! drive them over HTTP as a user would. Their harness (the stack, the webhook receiver,
//! the fake providers) is `conduit-testkit`; this library is empty.
