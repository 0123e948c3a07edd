//! Request/response pairing on one connection: requests queue up in order (pipelining) and
//! responses answer them first in, first out.

use std::collections::VecDeque;

use crate::{
    capture::event::KernelTrace,
    protocols::http1::{RequestHead, RequestHint, RequestHints, ResponseHead},
};

/// One request and, once it comes, its response.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub id: u64,
    pub request: Box<RequestHead>,
    /// Time of the read/write that carried the request's first byte.
    pub start_ts: u64,
    pub request_body: u64,
    /// A response head was paired with this request (its head may have been uncaptured).
    pub answered: bool,
    /// The response head, when captured.
    pub response: Option<Box<ResponseHead>>,
    pub response_body: u64,
    /// Ids the kernel decided for this request's span.
    pub kernel_trace: Option<KernelTrace>,
}

impl Exchange {
    fn hint(&self) -> RequestHint {
        match self.request.method.as_str() {
            "HEAD" => RequestHint::Head,
            "CONNECT" => RequestHint::Connect,
            _ => RequestHint::Normal,
        }
    }
}

#[derive(Debug)]
enum Slot {
    Real(Exchange),
    /// Requests that were not kept (queue full, or head uncaptured): they still take their
    /// turn so that later responses pair with the right requests.
    Dropped(u32),
}

/// Which message the response in progress belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Responding {
    None,
    Exchange(u64),
    /// A dropped request, or no request at all.
    Orphan,
}

/// Where a response head went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Paired {
    Exchange,
    Dropped,
    /// No request was waiting.
    Orphan,
}

/// The queue of unanswered requests of one connection, bounded by `cap` kept requests.
#[derive(Debug)]
pub(crate) struct Exchanges {
    slots: VecDeque<Slot>,
    real: usize,
    cap: usize,
    responding: Responding,
    next_id: u64,
}

impl Exchanges {
    pub fn new(cap: usize) -> Self {
        Exchanges { slots: VecDeque::new(), real: 0, cap: cap.max(1), responding: Responding::None, next_id: 0 }
    }

    /// Kept requests (answered or not) still in the queue.
    pub fn len(&self) -> usize {
        self.real
    }

    /// Methods of the kept requests still waiting for the end of their response.
    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().filter_map(|slot| match slot {
            Slot::Real(e) => Some(e.request.method.as_str()),
            Slot::Dropped(_) => None,
        })
    }

    /// Entries in the queue, dropped runs counting one each (bounded by about twice the cap).
    #[cfg(test)]
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Queues a request. Returns its id, or None when the queue is full (the request then
    /// only holds its place).
    pub fn push(&mut self, request: Box<RequestHead>, start_ts: u64, kernel_trace: Option<KernelTrace>) -> Option<u64> {
        if self.real >= self.cap {
            self.push_dropped();
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.real += 1;
        self.slots.push_back(Slot::Real(Exchange {
            id,
            request,
            start_ts,
            request_body: 0,
            answered: false,
            response: None,
            response_body: 0,
            kernel_trace,
        }));
        Some(id)
    }

    /// A request that will not become a span but will get a response.
    pub fn push_dropped(&mut self) {
        match self.slots.back_mut() {
            Some(Slot::Dropped(n)) => *n = n.saturating_add(1),
            _ => self.slots.push_back(Slot::Dropped(1)),
        }
    }

    /// The request with `id` ended after `body` body bytes.
    pub fn request_end(&mut self, id: u64, body: u64) {
        for slot in &mut self.slots {
            if let Slot::Real(ex) = slot
                && ex.id == id
            {
                ex.request_body = body;
                return;
            }
        }
    }

    /// A final response head (None: not captured) answers the oldest unanswered request.
    pub fn response_head(&mut self, head: Option<Box<ResponseHead>>) -> Paired {
        let idx = self.slots.iter().position(|s| match s {
            Slot::Real(ex) => !ex.answered,
            Slot::Dropped(_) => true,
        });
        let Some(idx) = idx else {
            self.responding = Responding::Orphan;
            return Paired::Orphan;
        };
        match &mut self.slots[idx] {
            Slot::Real(ex) => {
                ex.answered = true;
                ex.response = head;
                self.responding = Responding::Exchange(ex.id);
                Paired::Exchange
            }
            Slot::Dropped(n) => {
                *n -= 1;
                if *n == 0 {
                    self.slots.remove(idx);
                }
                self.responding = Responding::Orphan;
                Paired::Dropped
            }
        }
    }

    /// The response in progress ended after `body` body bytes; returns its finished exchange.
    pub fn response_end(&mut self, body: u64) -> Option<Exchange> {
        let Responding::Exchange(id) = std::mem::replace(&mut self.responding, Responding::None) else {
            return None;
        };
        let idx = self.slots.iter().position(|s| matches!(s, Slot::Real(ex) if ex.id == id))?;
        match self.slots.remove(idx) {
            Some(Slot::Real(mut ex)) => {
                self.real -= 1;
                ex.response_body = body;
                Some(ex)
            }
            _ => None,
        }
    }

    /// Empties the queue, returning the kept requests in order.
    pub fn drain(&mut self) -> Vec<Exchange> {
        self.real = 0;
        self.responding = Responding::None;
        self.slots
            .drain(..)
            .filter_map(|s| match s {
                Slot::Real(ex) => Some(ex),
                Slot::Dropped(_) => None,
            })
            .collect()
    }
}

impl RequestHints for Exchanges {
    fn hint(&self, mut k: usize) -> RequestHint {
        for slot in &self.slots {
            match slot {
                Slot::Real(ex) if ex.answered => {}
                Slot::Real(ex) => {
                    if k == 0 {
                        return ex.hint();
                    }
                    k -= 1;
                }
                Slot::Dropped(n) => {
                    let n = *n as usize;
                    if k < n {
                        return RequestHint::Normal;
                    }
                    k -= n;
                }
            }
        }
        RequestHint::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::http1::{parse_request, parse_response};

    fn req(method: &str) -> Box<RequestHead> {
        Box::new(parse_request(format!("{method} / HTTP/1.1\r\n\r\n").as_bytes()).unwrap().0)
    }

    fn resp(status: u16) -> Option<Box<ResponseHead>> {
        Some(Box::new(parse_response(format!("HTTP/1.1 {status} X\r\n\r\n").as_bytes()).unwrap().0))
    }

    #[test]
    fn fifo_pairing() {
        let mut q = Exchanges::new(8);
        let a = q.push(req("GET"), 1, None).unwrap();
        let b = q.push(req("POST"), 2, None).unwrap();
        q.request_end(b, 10);
        assert_eq!(q.response_head(resp(200)), Paired::Exchange);
        let done = q.response_end(5).unwrap();
        assert_eq!((done.id, done.response_body, done.response.unwrap().status), (a, 5, 200));
        assert_eq!(q.response_head(resp(201)), Paired::Exchange);
        let done = q.response_end(0).unwrap();
        assert_eq!((done.id, done.request_body), (b, 10));
        assert_eq!(q.response_head(resp(200)), Paired::Orphan);
        assert!(q.response_end(0).is_none());
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn dropped_requests_keep_their_turn() {
        let mut q = Exchanges::new(2);
        q.push(req("GET"), 1, None).unwrap();
        q.push(req("GET"), 2, None).unwrap();
        assert!(q.push(req("HEAD"), 3, None).is_none());
        assert!(q.push(req("GET"), 4, None).is_none());
        assert_eq!(q.slots(), 3, "the two dropped requests share one slot");
        for _ in 0..2 {
            q.response_head(resp(200));
            assert!(q.response_end(0).is_some());
        }
        // A new request after the dropped ones waits behind them.
        let late = q.push(req("HEAD"), 5, None).unwrap();
        assert_eq!(q.hint(0), RequestHint::Normal);
        assert_eq!(q.hint(2), RequestHint::Head);
        assert_eq!(q.response_head(resp(200)), Paired::Dropped);
        assert!(q.response_end(0).is_none());
        assert_eq!(q.response_head(resp(200)), Paired::Dropped);
        assert!(q.response_end(0).is_none());
        assert_eq!(q.response_head(resp(200)), Paired::Exchange);
        assert_eq!(q.response_end(0).unwrap().id, late);
    }

    #[test]
    fn hints_skip_the_answered_front() {
        let mut q = Exchanges::new(8);
        q.push(req("GET"), 1, None);
        q.push(req("HEAD"), 2, None);
        q.push(req("CONNECT"), 3, None);
        assert_eq!(q.hint(0), RequestHint::Normal);
        q.response_head(resp(200));
        assert_eq!(q.hint(0), RequestHint::Head);
        assert_eq!(q.hint(1), RequestHint::Connect);
        assert_eq!(q.hint(2), RequestHint::Normal);
        assert_eq!(q.drain().len(), 3);
        assert_eq!(q.len(), 0);
    }
}
