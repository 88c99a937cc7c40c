//! Decodes arbitrary bytes as option-phase structures and requests, the parsers
//! both sides use. They must return errors, never panic or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::protocol::{
    decode_info_request, decode_meta_request, OptionHeader, OptionReplyHeader, Request,
};

fuzz_target!(|data: &[u8]| {
    let _ = decode_info_request(data);
    let _ = decode_meta_request(data);
    if let Ok(b) = <[u8; 16]>::try_from(data.get(..16).unwrap_or(&[])) {
        let _ = OptionHeader::decode(&b);
    }
    if let Ok(b) = <[u8; 20]>::try_from(data.get(..20).unwrap_or(&[])) {
        let _ = OptionReplyHeader::decode(&b);
    }
    if let Ok(b) = <[u8; 28]>::try_from(data.get(..28).unwrap_or(&[])) {
        let _ = Request::decode(&b);
    }
});
