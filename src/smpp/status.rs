//! What a carrier's `command_status` means for the message: one table, after DOMAIN.md §1.9.

/// How the gateway reacts to a non-zero `command_status` in a submit_sm_resp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// Try the message again later (SMSC busy, queue full, system error).
    Temporary,
    /// The carrier asks us to slow down: retry, and the link backs off.
    Throttled,
    /// The message is wrong for this carrier; sending it again unchanged will not help.
    Permanent,
    /// The bind itself is in the wrong state: re-bind, then retry the message.
    Session,
}

pub const ESME_ROK: u32 = 0x00;
pub const ESME_RINVCMDID: u32 = 0x03;
pub const ESME_RINVBNDSTS: u32 = 0x04;
pub const ESME_RALYBND: u32 = 0x05;
pub const ESME_RSYSERR: u32 = 0x08;
pub const ESME_RBINDFAIL: u32 = 0x0D;
pub const ESME_RINVPASWD: u32 = 0x0E;
pub const ESME_RINVSYSID: u32 = 0x0F;
pub const ESME_RMSGQFUL: u32 = 0x14;
pub const ESME_RINVSYSTYP: u32 = 0x53;
pub const ESME_RTHROTTLED: u32 = 0x58;
pub const ESME_RX_T_APPN: u32 = 0x64;
pub const ESME_RX_P_APPN: u32 = 0x65;
pub const ESME_RSERTYPUNAVAIL: u32 = 0x102;

/// Classifies a submit_sm_resp error status. Unknown and vendor codes (0x400–0x4FF) are
/// permanent: a wrong "permanent" costs one message, a wrong "temporary" retries it for days.
pub fn classify(status: u32) -> StatusClass {
    match status {
        ESME_RTHROTTLED => StatusClass::Throttled,
        ESME_RSYSERR | ESME_RMSGQFUL | ESME_RX_T_APPN | ESME_RSERTYPUNAVAIL => {
            StatusClass::Temporary
        }
        ESME_RINVBNDSTS => StatusClass::Session,
        _ => StatusClass::Permanent,
    }
}

/// A bind refused for these reasons will be refused again: retrying only hammers the carrier
/// and can lock the account, so the bind stops until the configuration changes.
pub fn is_credential_failure(status: u32) -> bool {
    matches!(status, ESME_RINVPASWD | ESME_RINVSYSID | ESME_RINVSYSTYP)
}

/// The SMPP name of a status, for history and logs: `0x58 ESME_RTHROTTLED`.
pub fn describe(status: u32) -> String {
    let name = match status {
        0x00 => "ESME_ROK",
        0x01 => "ESME_RINVMSGLEN",
        0x02 => "ESME_RINVCMDLEN",
        0x03 => "ESME_RINVCMDID",
        0x04 => "ESME_RINVBNDSTS",
        0x05 => "ESME_RALYBND",
        0x08 => "ESME_RSYSERR",
        0x0A => "ESME_RINVSRCADR",
        0x0B => "ESME_RINVDSTADR",
        0x0D => "ESME_RBINDFAIL",
        0x0E => "ESME_RINVPASWD",
        0x0F => "ESME_RINVSYSID",
        0x14 => "ESME_RMSGQFUL",
        0x45 => "ESME_RSUBMITFAIL",
        0x53 => "ESME_RINVSYSTYP",
        0x58 => "ESME_RTHROTTLED",
        0x61 => "ESME_RINVSCHED",
        0x62 => "ESME_RINVEXPIRY",
        0x64 => "ESME_RX_T_APPN",
        0x65 => "ESME_RX_P_APPN",
        0x66 => "ESME_RX_R_APPN",
        0xFF => "ESME_RUNKNOWNERR",
        _ => "",
    };
    if name.is_empty() {
        format!("0x{status:02X}")
    } else {
        format!("0x{status:02X} {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_is_not_a_message_failure() {
        assert_eq!(classify(ESME_RTHROTTLED), StatusClass::Throttled);
    }

    #[test]
    fn kannels_temporary_set_is_retried() {
        for status in [0x08, 0x14, 0x64] {
            assert_eq!(classify(status), StatusClass::Temporary, "{status:#x}");
        }
    }

    #[test]
    fn bad_destination_and_unknown_codes_are_permanent() {
        for status in [0x0B, 0x45, 0x0A, 0x401, 0xFF] {
            assert_eq!(classify(status), StatusClass::Permanent, "{status:#x}");
        }
    }

    #[test]
    fn bad_credentials_stop_the_bind() {
        assert!(is_credential_failure(ESME_RINVPASWD));
        assert!(is_credential_failure(ESME_RINVSYSID));
        assert!(!is_credential_failure(ESME_RBINDFAIL));
    }

    #[test]
    fn statuses_are_described_by_name() {
        assert_eq!(describe(0x58), "0x58 ESME_RTHROTTLED");
        assert_eq!(describe(0x401), "0x401");
    }
}
