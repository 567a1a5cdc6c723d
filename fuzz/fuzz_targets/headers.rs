//! The message headers both ends of a remote backend read (parjob-remote): the worker's
//! identity in its Hello, the Welcome, RUN and DONE headers, INIT_FAILED, and a message's kind.
//! Whatever the bytes, each decoder returns a value or an error, never panics; and a value it
//! returns encodes back to what it decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parjob_remote::{DoneHeader, Identity, InitFailed, Kind, RunHeader, Welcome};

fuzz_target!(|data: &[u8]| {
    let _ = Kind::of(data);
    if let Ok(identity) = Identity::decode(data) {
        assert_eq!(Identity::decode(&identity.encode()).as_ref(), Ok(&identity));
        let _ = identity.check_same_build(1);
    }
    if let Ok(welcome) = Welcome::decode(data) {
        assert_eq!(Welcome::decode(&welcome.encode()), Ok(welcome));
    }
    if let Ok((run, frame)) = RunHeader::decode(data) {
        assert_eq!(frame.len() + RunHeader::LEN, data.len());
        let encoded = run.encode();
        assert_eq!(RunHeader::decode(&encoded).map(|(h, _)| h), Ok(run));
    }
    if let Ok((done, outcomes)) = DoneHeader::decode(data) {
        assert_eq!(outcomes.len() + DoneHeader::LEN, data.len());
        let encoded = done.encode();
        assert_eq!(DoneHeader::decode(&encoded).map(|(h, _)| h), Ok(done));
    }
    if let Ok(failed) = InitFailed::decode(data) {
        assert_eq!(InitFailed::decode(&failed.encode()), Ok(failed));
    }
});
