//! The probe's `count=N` workload (guest/probe/README.md) as the host sees it: its console
//! lines parsed, and the checksum of the memory it keeps rewriting recomputed, so snapshot and
//! migration tests can tell that every page came through.

/// Words and pages of the probe's count region (guest/probe/README.md, `count=N`).
pub const PAGES: u64 = 1024;
pub const WORDS: u64 = 512;

/// The word the probe writes in round `r` (a splitmix64 finaliser).
pub fn value(r: u64) -> u64 {
    let mut x = r.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The checksum the probe prints after `rounds` rounds.
pub fn expected_sum(rounds: u64) -> u64 {
    let slots = PAGES * WORDS;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for page in 0..PAGES {
        for word in 0..WORDS {
            let k = word * PAGES + page;
            let v = if rounds > k {
                // The last round r <= rounds with (r - 1) % slots == k.
                value(k + 1 + slots * ((rounds - 1 - k) / slots))
            } else {
                0
            };
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// One `count=` line.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    pub tick: u64,
    pub rounds: u64,
    pub clock: u64,
    pub sum: u64,
}

pub fn parse(line: &str) -> Option<Tick> {
    let mut t = Tick {
        tick: 0,
        rounds: 0,
        clock: 0,
        sum: 0,
    };
    let mut seen = 0;
    for field in line.split(' ') {
        let (k, v) = field.split_once('=')?;
        let n = match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok()?,
            None => v.parse().ok()?,
        };
        match k {
            "count" => t.tick = n,
            "rounds" => t.rounds = n,
            "clock" => t.clock = n,
            "sum" => t.sum = n,
            _ => return None,
        }
        seen += 1;
    }
    (seen == 4).then_some(t)
}

pub fn ticks(lines: &[String]) -> Vec<Tick> {
    lines.iter().filter_map(|l| parse(l)).collect()
}

pub fn check_sums(what: &str, ts: &[Tick]) {
    for t in ts {
        assert_eq!(
            t.sum,
            expected_sum(t.rounds),
            "{what}: tick {} after {} rounds",
            t.tick,
            t.rounds
        );
    }
}
