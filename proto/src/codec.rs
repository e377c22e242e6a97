//! The gRPC codec of ozfleet's services: prost, with small initial buffers.
//!
//! tonic gives every stream an 8 KiB encode and an 8 KiB decode buffer and keeps them for
//! the stream's life. A node's attach stream lives as long as the node is attached, so at
//! the gateway those two buffers were most of what an idle node costs. Node-link messages
//! are a few hundred bytes; the buffers start small and grow for a larger one.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial capacity of each stream's encode and decode buffer.
pub const INITIAL_BUFFER_BYTES: usize = 512;
/// Encoded messages are handed to HTTP/2 once this much is buffered (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// prost encoding with [`INITIAL_BUFFER_BYTES`] buffers (the generated clients and
/// servers use it: `codec_path` in `build.rs`).
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffer_settings())
    }
}
