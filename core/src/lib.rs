pub mod clock;
pub mod doc;
pub mod entry;
pub mod ids;
