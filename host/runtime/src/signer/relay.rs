//! The relay of one request between a running guest and its caller, as a
//! named state machine. The guest's handler runs (the *call*); at some point
//! it sets its answer on the outparam (the *answer*: a head and a body it
//! then writes); the host reads that body into memory as it is written (the
//! *body*). The three finish in any order. The relay says what to wait for
//! next and when the exchange is over; `SignerHost::exchange` performs the
//! waits. Why it matters: the instance is given back to its caller only
//! after a call that returned cleanly with a whole answer, and an answer is
//! sent only when it is whole, so no half-written answer and no instance in
//! an unknown state ever serves again.

/// What the guest did with its answer so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Not set yet: the outparam may still be set.
    Unset,
    /// Set with a response; its body is being read.
    Reading,
    /// Set, and its body read to the end (or failed: the driver keeps which).
    Read,
    /// Never set: the outparam was dropped, or the call returned without it.
    Missing,
}

/// How the call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Call {
    Running,
    Returned,
    /// A trap or an error: nothing more comes from the guest.
    Failed,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Wait for whichever of these comes first.
    Wait { answer: bool, body: bool, call: bool },
    /// The call returned; an answer set just before may not have been
    /// seen yet: look at the outparam once, without waiting, then feed
    /// [`Relay::answer_set`] or [`Relay::answer_missing`].
    CheckAnswerOnce,
    /// The call failed with the body still being read: poll it once
    /// without waiting (what was written before the failure is taken only
    /// when it is the whole answer), then feed [`Relay::body_done`] or
    /// [`Relay::body_unfinished`].
    PollBodyOnce,
    /// The exchange is over.
    Done,
}

/// One request's relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Relay {
    answer: Answer,
    call: Call,
    /// After a failed call, the one poll of the body was made.
    polled_after_failure: bool,
}

impl Relay {
    pub(super) fn new() -> Self {
        Relay { answer: Answer::Unset, call: Call::Running, polled_after_failure: false }
    }

    #[cfg(test)]
    pub(super) fn answer(&self) -> Answer {
        self.answer
    }

    #[cfg(test)]
    pub(super) fn call(&self) -> Call {
        self.call
    }

    /// The guest set a response on its outparam: its body is read from now on.
    pub(super) fn answer_set(&mut self) {
        if self.answer == Answer::Unset {
            self.answer = Answer::Reading;
        }
    }

    /// The outparam was dropped, or looked at after the call and found unset.
    pub(super) fn answer_missing(&mut self) {
        if self.answer == Answer::Unset {
            self.answer = Answer::Missing;
        }
    }

    /// The body's read ended (whole, or with an error the driver keeps).
    pub(super) fn body_done(&mut self) {
        if self.answer == Answer::Reading {
            self.answer = Answer::Read;
        }
    }

    /// The one poll after a failed call found the body unfinished.
    pub(super) fn body_unfinished(&mut self) {
        self.polled_after_failure = true;
    }

    /// The call returned (`ok`) or trapped/failed.
    pub(super) fn call_ended(&mut self, ok: bool) {
        if self.call == Call::Running {
            self.call = if ok { Call::Returned } else { Call::Failed };
        }
    }

    /// What to do next.
    pub(super) fn next(&self) -> Next {
        match (self.call, self.answer) {
            (Call::Running, answer) => {
                Next::Wait { answer: answer == Answer::Unset, body: answer == Answer::Reading, call: true }
            }
            (_, Answer::Unset) => Next::CheckAnswerOnce,
            // Once the guest returned, only its body may still be in flight (a
            // guest that kept it open runs into the request's deadline).
            (Call::Returned, Answer::Reading) => Next::Wait { answer: false, body: true, call: false },
            (Call::Failed, Answer::Reading) if !self.polled_after_failure => Next::PollBodyOnce,
            _ => Next::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT_START: Next = Next::Wait { answer: true, body: false, call: true };

    #[test]
    fn answer_then_body_then_return_is_a_whole_answer_from_a_clean_instance() {
        let mut relay = Relay::new();
        assert_eq!(relay.next(), AT_START);
        relay.answer_set();
        assert_eq!(relay.next(), Next::Wait { answer: false, body: true, call: true });
        relay.body_done();
        assert_eq!(relay.next(), Next::Wait { answer: false, body: false, call: true }, "the guest still runs");
        relay.call_ended(true);
        assert_eq!(relay.next(), Next::Done);
        assert_eq!((relay.answer(), relay.call()), (Answer::Read, Call::Returned));
    }

    #[test]
    fn an_answer_whose_body_ends_after_the_return_is_waited_for() {
        let mut relay = Relay::new();
        relay.answer_set();
        relay.call_ended(true);
        assert_eq!(relay.next(), Next::Wait { answer: false, body: true, call: false });
        relay.body_done();
        assert_eq!(relay.next(), Next::Done);
    }

    #[test]
    fn an_answer_set_just_before_the_return_is_looked_for_once() {
        let mut relay = Relay::new();
        relay.call_ended(true);
        assert_eq!(relay.next(), Next::CheckAnswerOnce);
        relay.answer_set();
        assert_eq!(relay.next(), Next::Wait { answer: false, body: true, call: false });
        relay.body_done();
        assert_eq!(relay.next(), Next::Done);
        // Not there either: over, without an answer.
        let mut relay = Relay::new();
        relay.call_ended(true);
        relay.answer_missing();
        assert_eq!(relay.next(), Next::Done);
        assert_eq!(relay.answer(), Answer::Missing);
    }

    #[test]
    fn a_trap_after_the_answer_takes_only_what_was_whole_and_waits_no_longer() {
        let mut relay = Relay::new();
        relay.answer_set();
        relay.call_ended(false);
        assert_eq!(relay.next(), Next::PollBodyOnce, "nothing more comes after a trap: one look, no wait");
        relay.body_unfinished();
        assert_eq!(relay.next(), Next::Done);
        assert_eq!((relay.answer(), relay.call()), (Answer::Reading, Call::Failed), "an unfinished answer");
        // The body was whole by then: taken.
        let mut relay = Relay::new();
        relay.answer_set();
        relay.call_ended(false);
        relay.body_done();
        assert_eq!(relay.next(), Next::Done);
        assert_eq!(relay.answer(), Answer::Read);
        // A body read before the trap needs no poll.
        let mut relay = Relay::new();
        relay.answer_set();
        relay.body_done();
        relay.call_ended(false);
        assert_eq!(relay.next(), Next::Done);
    }

    #[test]
    fn a_trap_before_any_answer_looks_once_then_ends() {
        let mut relay = Relay::new();
        relay.call_ended(false);
        assert_eq!(relay.next(), Next::CheckAnswerOnce);
        relay.answer_missing();
        assert_eq!(relay.next(), Next::Done);
        assert_eq!((relay.answer(), relay.call()), (Answer::Missing, Call::Failed));
    }

    #[test]
    fn a_dropped_outparam_stops_the_wait_for_an_answer_but_not_for_the_call() {
        let mut relay = Relay::new();
        relay.answer_missing();
        assert_eq!(relay.next(), Next::Wait { answer: false, body: false, call: true });
        relay.call_ended(true);
        assert_eq!(relay.next(), Next::Done);
    }

    #[test]
    fn events_after_their_time_change_nothing() {
        let mut relay = Relay::new();
        relay.answer_set();
        relay.body_done();
        relay.call_ended(true);
        let done = relay;
        // A second answer, a late end of the call, a body end: the relay stays where it was.
        relay.answer_set();
        relay.answer_missing();
        relay.call_ended(false);
        relay.body_done();
        assert_eq!(relay, done);
    }
}
