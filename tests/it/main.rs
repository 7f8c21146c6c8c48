//! Courier's integration tests: the real `courier` binary, real files, and
//! (from the dispatch issue on) the real RabbitMQ.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod agent;
mod cli;
mod cluster;
mod compose;
mod control;
mod dispatch;
mod flow;
mod hardening;
mod operations;
mod reliability;
mod scale;
mod support;
mod ui;
