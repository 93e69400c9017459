//! What an error frame says: the code a receiver acts on.

/// What an error frame means, for the receiver to act on (its text is for people).
/// A code this version does not know decodes as [`ErrorCode::Other`]: nothing is
/// decided on a code the receiver cannot read, and the text still reaches people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Anything else: only the text says what.
    Other = 0,
    /// The destination never started the guest (the source still has it).
    NeverStarted = 1,
    /// The connection is not the migration in progress at the destination.
    OtherMigration = 2,
    /// The destination's VM has ended: it will ask for nothing more.
    VmEnded = 3,
    /// Too many connections are saying hello at once; try later.
    Busy = 4,
    /// The first frame was not a valid hello of this version, or came too slowly.
    BadHello = 5,
    /// The first frame was an intact frame of another wire version.
    BadVersion = 6,
    /// A new connection for a channel that is already open.
    ChannelOpen = 7,
    /// The destination cannot hold the guest's RAM (its hugetlb pool is short): it
    /// built no VM, so the guest never started there.
    NoMemory = 8,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::Other,
        ErrorCode::NeverStarted,
        ErrorCode::OtherMigration,
        ErrorCode::VmEnded,
        ErrorCode::Busy,
        ErrorCode::BadHello,
        ErrorCode::BadVersion,
        ErrorCode::ChannelOpen,
        ErrorCode::NoMemory,
    ];

    /// The code for a wire value; unknown values are [`ErrorCode::Other`].
    pub fn from_wire(v: u16) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|&c| c as u16 == v)
            .unwrap_or(ErrorCode::Other)
    }

    /// True if a destination refusing with this code says it never started the guest
    /// (it is not, or not yet, the migration this guest went to), so the source may
    /// run the guest on.
    pub fn guest_not_started(self) -> bool {
        matches!(
            self,
            ErrorCode::NeverStarted | ErrorCode::OtherMigration | ErrorCode::NoMemory
        )
    }

    /// A short name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Other => "error",
            ErrorCode::NeverStarted => "never-started",
            ErrorCode::OtherMigration => "other-migration",
            ErrorCode::VmEnded => "vm-ended",
            ErrorCode::Busy => "busy",
            ErrorCode::BadHello => "bad-hello",
            ErrorCode::BadVersion => "bad-version",
            ErrorCode::ChannelOpen => "channel-open",
            ErrorCode::NoMemory => "no-memory",
        }
    }
}
