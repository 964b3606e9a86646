//! What an upload really is (its first bytes, never the client's word), image dimensions from
//! the header, and thumbnails decoded within fixed limits and re-encoded without metadata.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

/// The image types the gateway decodes (the `image` crate is built with these four only).
pub const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Bytes read before deciding: enough for every magic number and for the header of an image
/// (JPEG's size follows its EXIF segment, at most 64 KiB, in the first segments).
pub const SNIFF_BYTES: usize = 128 * 1024;

/// The longest side an uploaded image may have, and its most pixels: a decoder allocates four
/// bytes a pixel, so a small file claiming 100k × 100k (a decompression bomb) is refused at
/// upload, and thumbnails decode under the same limits.
pub const MAX_SIDE: u32 = 16_384;
pub const MAX_PIXELS: u64 = 40_000_000;
/// Most memory one thumbnail decode may allocate.
const MAX_DECODE_ALLOC: u64 = 256 * 1024 * 1024;

pub fn is_image(content_type: &str) -> bool {
    IMAGE_TYPES.contains(&content_type)
}

fn format_of(content_type: &str) -> Option<ImageFormat> {
    Some(match content_type {
        "image/png" => ImageFormat::Png,
        "image/jpeg" => ImageFormat::Jpeg,
        "image/gif" => ImageFormat::Gif,
        "image/webp" => ImageFormat::WebP,
        _ => return None,
    })
}

/// The content type of a body from its first bytes (`whole` when they are all of it): a known
/// magic number; markup (`text/html`, `image/svg+xml`, `text/xml`), which a browser could run;
/// else UTF-8 text as `text/plain`; else `application/octet-stream`.
pub fn sniff(head: &[u8], whole: bool) -> &'static str {
    if let Some(kind) = infer::get(head) {
        return kind.mime_type();
    }
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let lead = &head[start..head.len().min(start + 256)];
    let lower: Vec<u8> = lead.to_ascii_lowercase();
    if lower.starts_with(b"<svg") || contains(&lower, b"<svg") {
        return "image/svg+xml";
    }
    if lower.starts_with(b"<?xml") {
        return "text/xml";
    }
    // infer knows the common tags; these run scripts too.
    for tag in [
        &b"<html"[..],
        b"<!doctype",
        b"<script",
        b"<body",
        b"<iframe",
        b"<object",
    ] {
        if contains(&lower, tag) {
            return "text/html";
        }
    }
    let text = match std::str::from_utf8(head) {
        Ok(_) => true,
        // Cut inside a character at the end of the head: still text.
        Err(e) => !whole && e.error_len().is_none(),
    };
    if text && !head.contains(&0) {
        "text/plain"
    } else {
        "application/octet-stream"
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Why an image's dimensions were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DimensionError {
    /// The header does not read as the type its magic number claims.
    Unreadable(String),
    /// More pixels than the gateway decodes (a decompression bomb, or just too big).
    TooLarge(String),
}

impl std::fmt::Display for DimensionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(m) | Self::TooLarge(m) => f.write_str(m),
        }
    }
}

/// Width and height from an image's header, refused past [`MAX_SIDE`] or [`MAX_PIXELS`].
pub fn dimensions(head: &[u8], content_type: &str) -> Result<(u32, u32), DimensionError> {
    let format = format_of(content_type).ok_or_else(|| {
        DimensionError::Unreadable(format!("{content_type} is not an image type"))
    })?;
    let (w, h) = ImageReader::with_format(Cursor::new(head), format)
        .into_dimensions()
        .map_err(|e| {
            DimensionError::Unreadable(format!(
                "the image's header does not read as {content_type}: {e}"
            ))
        })?;
    if w == 0 || h == 0 {
        return Err(DimensionError::Unreadable("the image has no pixels".into()));
    }
    if w > MAX_SIDE || h > MAX_SIDE || u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(DimensionError::TooLarge(format!(
            "the image is {w}×{h}; at most {MAX_SIDE} pixels a side and {MAX_PIXELS} pixels in all"
        )));
    }
    Ok((w, h))
}

/// A PNG at most `max_side` pixels a side (never enlarged). Decoded with size and memory limits
/// and encoded afresh, so nothing of the original's metadata (EXIF: camera, location) survives.
pub fn thumbnail(bytes: &[u8], content_type: &str, max_side: u32) -> Result<Vec<u8>, String> {
    let format =
        format_of(content_type).ok_or_else(|| format!("{content_type} is not an image type"))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| format!("the image does not decode: {e}"))?;
    let image = if image.width() > max_side || image.height() > max_side {
        image.thumbnail(max_side, max_side)
    } else {
        image
    };
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| format!("the thumbnail does not encode: {e}"))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut out, ImageFormat::Png)
            .expect("encodes");
        out.into_inner()
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn types_are_read_from_the_bytes_not_the_name() {
        assert_eq!(sniff(&png(2, 2), true), "image/png");
        assert_eq!(
            sniff(b"<!DOCTYPE html><script>alert(1)</script>", true),
            "text/html"
        );
        assert_eq!(sniff(b"  <html><body>hi</body></html>", true), "text/html");
        assert_eq!(
            sniff(
                b"<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"x()\"/>",
                true
            ),
            "image/svg+xml"
        );
        assert_eq!(sniff("hello, wörld\n".as_bytes(), true), "text/plain");
        assert_eq!(sniff(b"%PDF-1.7\n", true), "application/pdf");
        assert_eq!(
            sniff(&[0, 1, 2, 3, 250, 251], true),
            "application/octet-stream"
        );
        // A head cut inside a character is still text; a whole body is not.
        let cut = &"é".as_bytes()[..1];
        assert_eq!(sniff(&[b"abc", cut].concat(), false), "text/plain");
        assert_eq!(
            sniff(&[b"abc", cut].concat(), true),
            "application/octet-stream"
        );
    }

    #[test]
    fn dimensions_come_from_the_header_and_bombs_are_refused() {
        assert_eq!(dimensions(&png(30, 20), "image/png"), Ok((30, 20)));
        // A PNG header claiming 100000 × 100000 pixels: refused before any decoding.
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        // The IHDR chunk's CRC over its type and data, so the header is a valid one.
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = dimensions(&bomb, "image/png").expect_err("a bomb");
        assert!(matches!(e, DimensionError::TooLarge(_)), "{e}");
        assert!(e.to_string().contains("100000×100000"), "{e}");
        assert!(dimensions(b"<html>", "image/png").is_err());
    }

    #[test]
    fn thumbnails_shrink_to_fit_and_never_grow() {
        let thumb = thumbnail(&png(640, 320), "image/png", 160).expect("thumbnail");
        assert_eq!(dimensions(&thumb, "image/png"), Ok((160, 80)));
        let small = thumbnail(&png(40, 30), "image/png", 160).expect("thumbnail");
        assert_eq!(dimensions(&small, "image/png"), Ok((40, 30)));
    }

    #[test]
    fn a_thumbnail_carries_none_of_the_originals_exif() {
        // A JPEG with an APP1 Exif segment holding a marker string where GPS data would be.
        let image = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 99]));
        let mut jpeg = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut jpeg, ImageFormat::Jpeg)
            .expect("encodes");
        let jpeg = jpeg.into_inner();
        let secret = b"Exif\0\0GPS-52.5200N-13.4050E";
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&((secret.len() + 2) as u16).to_be_bytes());
        app1.extend_from_slice(secret);
        let with_exif = [&jpeg[..2], &app1[..], &jpeg[2..]].concat();
        assert_eq!(dimensions(&with_exif, "image/jpeg"), Ok((64, 48)));
        let thumb = thumbnail(&with_exif, "image/jpeg", 32).expect("thumbnail");
        assert!(!contains(&thumb, b"GPS-52.5200N"), "EXIF survived");
        assert!(!contains(&thumb, b"Exif"), "EXIF survived");
        assert_eq!(sniff(&thumb, true), "image/png");
    }
}
