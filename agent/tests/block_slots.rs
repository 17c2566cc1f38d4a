//! The `block` slot backend on pre-sized files standing in for partitions: never created, never
//! truncated, and an image larger than the partition is refused before anything is written.

mod common;
use common::*;

const PARTITION: usize = 512 * 1024;

fn block_device() -> Device {
    let dev = Device::new(Options::default());
    for slot in ["a", "b"] {
        std::fs::write(dev.path(&format!("slots/{slot}.img")), vec![0xAAu8; PARTITION]).unwrap();
    }
    let cfg = std::fs::read_to_string(&dev.config)
        .unwrap()
        .replace("backend = \"file\"", "backend = \"block\"");
    std::fs::write(&dev.config, cfg).unwrap();
    dev
}

#[test]
fn block_slot_is_written_in_place_and_keeps_its_size() {
    let dev = block_device();
    let bundle = dev.bundle("v2", "2.0.0", 100_000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let b = dev.slot_bytes("b");
    assert_eq!(b.len(), PARTITION, "a partition is never truncated");
    assert_eq!(&b[..100_000], &image_bytes("2.0.0", 100_000)[..]);
    assert_eq!(dev.status()["slots"]["b"]["state"], "good");
}

#[test]
fn image_larger_than_the_partition_is_no_space_and_nothing_is_written() {
    let dev = block_device();
    let bundle = dev.bundle("big", "2.0.0", PARTITION + 1, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no_space"), "{}", text(&o));
    assert_eq!(
        dev.slot_bytes("b"),
        vec![0xAAu8; PARTITION],
        "nothing may be written"
    );
    dev.assert_bootable();
}

#[test]
fn missing_block_device_is_an_error_naming_it() {
    let dev = block_device();
    std::fs::remove_file(dev.path("slots/b.img")).unwrap();
    let bundle = dev.bundle("v2", "2.0.0", 1000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("b.img"), "{}", text(&o));
    dev.assert_bootable();
}
