//! Transports turn bytes into `Request`s for the scheduler and `Event`s back into bytes.
//! They never see the model.

pub mod mqtt;
pub mod socket;
