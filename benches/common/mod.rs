//! What the benches share.

/// The `i`th of 10,000,000 distinct Swedish mobile numbers, in an order that jumps across the
/// range as real traffic's numbers do: consecutive numbers would keep every index on recipients
/// writing into one page. 7,654,321 is coprime to 10^7, so no two `i` below 10^7 share one.
pub fn recipient(i: usize) -> String {
    format!(
        "+4670{:07}",
        (i as u64 % 10_000_000) * 7_654_321 % 10_000_000
    )
}
