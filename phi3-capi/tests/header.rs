//! The committed header agrees with the crate: version macros match Cargo.toml and the ABI
//! constant, every status code is declared, and every create/destroy pair is present.
//! (CI separately regenerates the header with the pinned cbindgen and fails on any diff.)

use std::path::Path;

fn header() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../include/phi3.h");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn version_macros_match_the_crate() {
    let h = header();
    let v: Vec<&str> = env!("CARGO_PKG_VERSION").split('.').collect();
    assert!(h.contains(&format!("#define PHI3_VERSION_MAJOR {}", v[0])));
    assert!(h.contains(&format!("#define PHI3_VERSION_MINOR {}", v[1])));
    assert!(h.contains(&format!("#define PHI3_VERSION_PATCH {}", v[2])));
    assert!(h.contains(&format!("#define PHI3_ABI_VERSION {}", phi3::phi3_abi_version())));
}

#[test]
fn status_codes_are_declared_with_their_values() {
    let h = header();
    for (name, value) in [
        ("PHI3_OK", phi3::PHI3_OK),
        ("PHI3_ERR_INVALID_ARGUMENT", phi3::PHI3_ERR_INVALID_ARGUMENT),
        ("PHI3_ERR_IO", phi3::PHI3_ERR_IO),
        ("PHI3_ERR_MODEL_FORMAT", phi3::PHI3_ERR_MODEL_FORMAT),
        ("PHI3_ERR_TOKEN_OUT_OF_RANGE", phi3::PHI3_ERR_TOKEN_OUT_OF_RANGE),
        ("PHI3_ERR_CONTEXT_FULL", phi3::PHI3_ERR_CONTEXT_FULL),
        ("PHI3_ERR_OUT_OF_MEMORY", phi3::PHI3_ERR_OUT_OF_MEMORY),
        ("PHI3_ERR_DEVICE", phi3::PHI3_ERR_DEVICE),
        ("PHI3_ERR_CANCELLED", phi3::PHI3_ERR_CANCELLED),
        ("PHI3_ERR_BUSY", phi3::PHI3_ERR_BUSY),
        ("PHI3_ERR_BUFFER_TOO_SMALL", phi3::PHI3_ERR_BUFFER_TOO_SMALL),
        ("PHI3_ERR_UNSUPPORTED", phi3::PHI3_ERR_UNSUPPORTED),
        ("PHI3_ERR_INTERNAL", phi3::PHI3_ERR_INTERNAL),
    ] {
        assert!(h.contains(&format!("#define {name} {value}")), "{name} = {value} missing");
    }
}

#[test]
fn every_handle_has_its_create_and_free() {
    let h = header();
    for f in [
        "phi3_model_options_init",
        "phi3_model_load",
        "phi3_model_load_demo",
        "phi3_model_free",
        "phi3_session_options_init",
        "phi3_session_new",
        "phi3_session_load",
        "phi3_session_fork",
        "phi3_session_free",
        "phi3_generate_options_init",
    ] {
        assert!(h.contains(&format!(" {f}(")), "{f} missing from phi3.h");
    }
    assert!(h.contains("typedef struct phi3_model phi3_model;"));
    assert!(h.contains("typedef struct phi3_session phi3_session;"));
}
