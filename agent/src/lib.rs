//! TokenFlow's node agent: kernel TCP capture turned into one telemetry window per interval.
//! The binary (`tokenflow-agent`) wires these modules to the command line and the sinks.

pub mod backlog;
pub mod btf_offsets;
pub mod capture;
pub mod cli;
pub mod gpu;
pub mod hist;
pub mod run;
pub mod sink;
pub mod uprobe_target;
pub mod window;
