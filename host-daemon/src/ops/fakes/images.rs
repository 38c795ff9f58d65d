//! [`FakeImages`]: the in-memory images of the fakes (see the parent
//! module).

use super::{FakeImages, Image, lock};
use crate::image::luks1::recovery::HeaderKey;
use crate::image::{ImageError, ImageInfo, Images};
use crate::model::{Format, copy_path};

fn img_err(m: String) -> ImageError {
    ImageError::Check(m)
}

impl Images for FakeImages {
    fn create(&self, path: &str, format: Format, size: u64, key: &[u8]) -> Result<(), ImageError> {
        let mut w = lock(&self.0);
        w.fails("create", format!("create {path}"))
            .map_err(img_err)?;
        if w.images.contains_key(path) {
            return Err(ImageError::Unsuitable(format!("{path} already exists")));
        }
        let data_key = w.new_key();
        w.images.insert(
            path.to_owned(),
            Image {
                format,
                size,
                keys: vec![key.to_vec()],
                data_key,
                data: 0,
                backing: false,
            },
        );
        Ok(())
    }
    fn settle(&self, path: &str) -> Result<(), ImageError> {
        lock(&self.0)
            .fails("settle", format!("settle {path}"))
            .map_err(img_err)
    }
    fn opens_with(&self, path: &str, _format: Format, key: &[u8]) -> Result<bool, ImageError> {
        let w = lock(&self.0);
        let i = w
            .images
            .get(path)
            .ok_or_else(|| img_err(format!("no image {path}")))?;
        Ok(i.keys.iter().any(|k| k == key))
    }
    fn info(&self, path: &str, _format: Format) -> Result<ImageInfo, ImageError> {
        let w = lock(&self.0);
        let i = w
            .images
            .get(path)
            .ok_or_else(|| img_err(format!("no image {path}")))?;
        Ok(ImageInfo {
            virtual_size: i.size,
            encrypted: !i.keys.is_empty(),
            backing: i.backing,
        })
    }
    fn backing_path(&self, path: &str, _format: Format) -> Result<Option<String>, ImageError> {
        let w = lock(&self.0);
        Ok(w.backing_of.get(path).cloned())
    }
    fn virtual_size(&self, path: &str) -> Result<u64, ImageError> {
        let w = lock(&self.0);
        w.images
            .get(path)
            .map(|i| i.size)
            .ok_or_else(|| img_err(format!("no image {path}")))
    }
    fn header_key(&self, path: &str, _format: Format, key: &[u8]) -> Result<HeaderKey, ImageError> {
        let w = lock(&self.0);
        let i = w
            .images
            .get(path)
            .ok_or_else(|| img_err(format!("no image {path}")))?;
        if !i.keys.iter().any(|k| k == key) {
            return Err(img_err(format!("the volume's key does not open {path}")));
        }
        // The fake's data key stands for the real one: 64 bytes made of it.
        let mut data_key = zeroize::Zeroizing::new(vec![0u8; 64]);
        data_key[..8].copy_from_slice(&i.data_key.to_be_bytes());
        Ok(HeaderKey {
            data_key,
            uuid: format!("00000000-0000-4000-8000-{:012x}", i.data_key),
            payload_sectors: 4040,
            region: (0, 2_068_480),
            virtual_size: i.size,
        })
    }
    fn replace_passphrase(
        &self,
        path: &str,
        _f: Format,
        old: &[u8],
        new: &[u8],
    ) -> Result<(), ImageError> {
        let mut w = lock(&self.0);
        w.fails("replace_passphrase", format!("replace_passphrase {path}"))
            .map_err(img_err)?;
        let i = w
            .images
            .get_mut(path)
            .ok_or_else(|| img_err(format!("no image {path}")))?;
        if !i.keys.iter().any(|k| k == old) {
            return Err(img_err("the old key does not open it".into()));
        }
        i.keys = vec![new.to_vec()];
        Ok(())
    }
    fn deep_rekey(
        &self,
        path: &str,
        _f: Format,
        old: &[u8],
        new: &[u8],
        _bw: u64,
    ) -> Result<(), ImageError> {
        let mut w = lock(&self.0);
        w.fails("deep_rekey", format!("deep_rekey {path}"))
            .map_err(img_err)?;
        let k = w.new_key();
        let i = w
            .images
            .get_mut(path)
            .ok_or_else(|| img_err(format!("no image {path}")))?;
        if !i.keys.iter().any(|x| x == old) {
            return Err(img_err("the current key does not open it".into()));
        }
        i.keys = vec![new.to_vec()];
        i.data_key = k;
        Ok(())
    }
    fn encrypt(&self, path: &str, _f: Format, key: &[u8]) -> Result<(), ImageError> {
        let mut w = lock(&self.0);
        w.fails("encrypt", format!("encrypt {path}"))
            .map_err(img_err)?;
        let k = w.new_key();
        let i = w
            .images
            .get_mut(path)
            .ok_or_else(|| img_err(format!("no image {path}")))?;
        i.keys = vec![key.to_vec()];
        i.data_key = k;
        Ok(())
    }
    fn decrypt(&self, path: &str, _f: Format, key: &[u8]) -> Result<(), ImageError> {
        let mut w = lock(&self.0);
        w.fails("decrypt", format!("decrypt {path}"))
            .map_err(img_err)?;
        let i = w
            .images
            .get_mut(path)
            .ok_or_else(|| img_err(format!("no image {path}")))?;
        if !i.keys.iter().any(|x| x == key) {
            return Err(img_err("the key does not open it".into()));
        }
        i.keys.clear();
        Ok(())
    }
    fn new_copy(
        &self,
        path: &str,
        generation: u64,
        format: Format,
        size: u64,
        key: &[u8],
    ) -> Result<String, ImageError> {
        let mut w = lock(&self.0);
        w.fails("new_copy", format!("new_copy {path}"))
            .map_err(img_err)?;
        let k = w.new_key();
        let copy = copy_path(path, generation);
        w.images.insert(
            copy.clone(),
            Image {
                format,
                size,
                keys: vec![key.to_vec()],
                data_key: k,
                data: 0,
                backing: false,
            },
        );
        Ok(copy)
    }
    fn discard_copies(&self, path: &str) -> Result<(), ImageError> {
        let mut w = lock(&self.0);
        w.calls.push(format!("discard_copies {path}"));
        w.images.retain(|p, _| !crate::model::is_copy_of(p, path));
        Ok(())
    }
    fn swap_in_copy(&self, path: &str, generation: u64) -> Result<bool, ImageError> {
        let mut w = lock(&self.0);
        w.fails("swap_in_copy", format!("swap_in_copy {path}"))
            .map_err(img_err)?;
        let Some(copy) = w.images.remove(&copy_path(path, generation)) else {
            return Ok(false);
        };
        w.images.insert(path.to_owned(), copy);
        Ok(true)
    }
}
