//! `conduit-generator` owns the execution of generation jobs: it consumes the `jobs`
//! queue with bounded concurrency, runs each job's provider (the built-in local renderer
//! or a remote video API), stores the finished video and publishes the task's status
//! events (processing, progress, completed or failed). It also listens on the control
//! fanout for cancellations and stops the work they name.

pub mod render;
