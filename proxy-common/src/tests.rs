//! The drop counter's sampling, run on the host: how often it records a drop,
//! and the weights that make the records add up to every drop.

extern crate std;
use std::vec::Vec;

use super::*;

/// Counts a drop at each of `times` (ns) in `counter`, as the
/// program does; returns the weights of those the sample recorded.
fn drive(counter: &mut Counter, times: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut weights = Vec::new();
    for now in times {
        counter.packets += 1;
        if counter.records(counter.packets) {
            weights.push(counter.pace_sample(now));
        }
    }
    weights
}

/// `count` drops evenly spread over `seconds`, from `start_ns` on.
fn evenly(start_ns: u64, count: u64, seconds: u64) -> impl Iterator<Item = u64> {
    let step = seconds * DROP_SAMPLE_WINDOW_NS / count;
    (0..count).map(move |i| start_ns + i * step)
}

const START: u64 = 5 * DROP_SAMPLE_WINDOW_NS;

#[test]
fn the_mask_records_about_the_budget_of_each_rate() {
    for (per_window, mask) in [
        (0, 0),
        (1, 0),
        (255, 0),
        (256, 1),
        (511, 1),
        (512, 3),
        (100_000, 511),
        (1 << 30, DROP_SAMPLE_MAX_EVERY as u32 - 1),
        (u64::MAX, DROP_SAMPLE_MAX_EVERY as u32 - 1),
    ] {
        assert_eq!(sample_mask(per_window), mask, "{per_window} drops a window");
    }
}

#[test]
fn a_slot_that_drops_little_records_every_drop() {
    let mut counter = Counter::default();
    let weights = drive(&mut counter, evenly(START, 2_000, 10));
    assert_eq!(weights.len(), 2_000);
    assert!(weights.iter().all(|&w| w == 1));
    // The budget per window, at once, is still exact.
    let burst = (0..DROP_SAMPLE_BUDGET).map(|i| START + 20 * DROP_SAMPLE_WINDOW_NS + i);
    assert!(drive(&mut counter, burst).iter().all(|&w| w == 1));
}

#[test]
fn a_flood_is_sampled_from_past_the_budget_and_its_weights_add_up() {
    for per_second in [1_000, 30_000, 1_000_000, 20_000_000] {
        let mut counter = Counter::default();
        let seconds = 3;
        let drops = per_second * seconds;
        let weights = drive(&mut counter, evenly(START, drops, seconds));
        assert!(weights[..DROP_SAMPLE_BUDGET as usize].iter().all(|&w| w == 1));
        assert!(weights.len() as u64 > DROP_SAMPLE_BUDGET, "{per_second}/s");
        // No more than twice the budget per window after the first, and
        // the first pays at most the budget plus one record per mask.
        let bound = DROP_SAMPLE_BUDGET * (2 * seconds + 1)
            + drops / DROP_SAMPLE_MAX_EVERY
            + DROP_SAMPLE_BUDGET;
        assert!((weights.len() as u64) <= bound, "{per_second}/s: {} records", weights.len());
        let estimate: u64 = weights.iter().sum();
        assert!(
            estimate.abs_diff(drops) <= 2 * DROP_SAMPLE_MAX_EVERY,
            "{per_second}/s: estimate {estimate} of {drops}"
        );
    }
}

#[test]
fn the_sparsest_sampling_is_capped() {
    let mut counter = Counter::default();
    let weights = drive(&mut counter, evenly(START, 200_000_000, 2));
    assert_eq!(weights.iter().copied().max(), Some(DROP_SAMPLE_MAX_EVERY));
}

#[test]
fn after_a_flood_a_trickle_is_exact_again_within_two_caps() {
    let mut counter = Counter::default();
    drive(&mut counter, evenly(START, 10_000_000, 1));
    assert_eq!(counter.sample_mask, DROP_SAMPLE_MAX_EVERY as u32 - 1);
    // A trickle, one drop a second: the first record after the flood
    // still sees some of it in its window, the second no longer does.
    let trickled = 3 * DROP_SAMPLE_MAX_EVERY;
    let trickle = (0..trickled).map(|i| START + (10 + i) * DROP_SAMPLE_WINDOW_NS);
    let weights = drive(&mut counter, trickle);
    let exact = weights.iter().rev().take_while(|&&w| w == 1).count() as u64;
    assert!(trickled - exact <= 2 * DROP_SAMPLE_MAX_EVERY, "exact only after {}", trickled - exact);
    assert_eq!(counter.sample_mask, 0);
    // The first record also stands for the flood's last unrecorded drops.
    let estimate = weights.iter().sum::<u64>();
    assert!(estimate.abs_diff(trickled) < DROP_SAMPLE_MAX_EVERY, "{estimate} of {trickled}");
}
