//! The control socket's request line (`control::parse_request`, one JSON object per
//! line): a request it reads is written back by the admin side (`control::call`'s
//! serialization) as one line that reads as the same request; a refusal is an `Error`
//! answer that the admin side reads back as one line. The admin side's reader of the
//! daemon's answers is fed the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::control::{parse_request, ControlResponse};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(line) {
        Ok(req) => {
            let text = serde_json::to_string(&req).expect("serializable");
            assert!(!text.contains('\n'), "{text}");
            let back = parse_request(&format!("{text}\n")).expect("the writer's request reads");
            assert_eq!(back, req);
        }
        Err(refusal) => {
            assert!(
                matches!(refusal, ControlResponse::Error { .. }),
                "{refusal:?}"
            );
            let text = serde_json::to_string(&refusal).expect("serializable");
            assert!(!text.contains('\n'), "{text}");
            let back: ControlResponse = serde_json::from_str(&text).expect("the answer reads");
            assert_eq!(back, refusal);
        }
    }
    // What the admin command reads from the daemon: any answer it accepts is one line
    // again and reads back the same.
    if let Ok(resp) = serde_json::from_str::<ControlResponse>(line) {
        let text = serde_json::to_string(&resp).expect("serializable");
        assert!(!text.contains('\n'), "{text}");
        let back: ControlResponse = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, resp, "{text}");
    }
});
