//! Response classes shared by retries, breakers and ejection: which statuses count as failures.

/// A set of HTTP status codes (100-599) as a bitmap: `Copy`, and a lookup is one shift.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub fn new(codes: &[u16]) -> Self {
        let mut set = [0u64; 10];
        for &c in codes {
            if c < 640 {
                set[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
        Self(set)
    }

    #[inline]
    pub fn contains(&self, code: u16) -> bool {
        code < 640 && self.0[(code / 64) as usize] & (1 << (code % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_exactly_its_codes() {
        let s = StatusSet::new(&[502, 503, 504]);
        assert!(s.contains(502) && s.contains(503) && s.contains(504));
        assert!(!s.contains(500) && !s.contains(200) && !s.contains(639));
    }
}
