//! Float vectors as little-endian bytes, the wire form of gradients.

/// `values` as little-endian f32 bytes (4 per value).
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Appends the f32 values of little-endian `bytes` to `out`; false if the length is not
/// a multiple of 4 (then `out` is unchanged).
pub fn extend_from_le_bytes(out: &mut Vec<f32>, bytes: &[u8]) -> bool {
    if bytes.len() % 4 != 0 {
        return false;
    }
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusal() {
        let v = [1.5f32, -0.0, f32::MIN_POSITIVE, 3e38];
        let bytes = f32_to_le_bytes(&v);
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[..4], &[0, 0, 0xc0, 0x3f]); // 1.5 = 0x3fc00000
        let mut out = Vec::new();
        assert!(extend_from_le_bytes(&mut out, &bytes));
        assert_eq!(out, v);
        assert!(!extend_from_le_bytes(&mut out, &bytes[1..]));
        assert_eq!(out.len(), 4);
    }
}
