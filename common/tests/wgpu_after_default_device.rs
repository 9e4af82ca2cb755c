//! A process that used burn's default device before opening l2l's wgpu engine (burn's
//! optimizer records load onto `Device::default()`, which is wgpu in a build with it)
//! still gets a working wgpu engine: it used to fail with "Service already initialized".
//! Its own test binary, so that nothing else in the process opens wgpu first.
#![cfg(feature = "wgpu")]

use l2l_common::burn::tensor::{DType, Device, Tensor};
use l2l_common::engine::{Backend, Engine, vulkan_driver_installed};
use l2l_common::{AnyPhi, Optimizee, OptimizerConfig, Quadratic};

#[test]
fn the_wgpu_engine_opens_after_the_default_device_was_used() {
    if !vulkan_driver_installed() {
        assert!(
            std::env::var("L2L_REQUIRE_ALL").map_or(true, |v| v != "1"),
            "no Vulkan driver (apt-get install mesa-vulkan-drivers); L2L_REQUIRE_ALL=1 forbids skips"
        );
        eprintln!("SKIPPED: no Vulkan driver is installed (apt-get install mesa-vulkan-drivers)");
        return;
    }
    let t = Tensor::<1>::ones([4], (&Device::default(), DType::F32));
    assert_eq!(l2l_common::tensor::to_f64(&t.sum()).unwrap(), vec![4.0]);
    let engine = Engine::open(Backend::Wgpu).unwrap_or_else(|e| panic!("{e}"));
    let o = Optimizee::Quadratic(Quadratic::from_seed(1, 4, 10).unwrap());
    let phi = AnyPhi::init(OptimizerConfig::default(), &[], 2).unwrap();
    let p = engine.load(o);
    let carry = engine.start(&phi, &p);
    let t = engine.truncation(&phi, &p, carry, 0, 3, None).unwrap();
    assert!(t.meta_loss.is_finite() && t.grad.tensors().flatten().any(|v| *v != 0.0));
}
