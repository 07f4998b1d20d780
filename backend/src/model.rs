//! The model folder: `config.json` (Llama), `model.safetensors`, `tokenizer.json`.
//!
//! `init-model` writes one with random weights and a byte-level BPE tokenizer trained on text
//! shipped in the binary, so the compute is real where no weights can be downloaded.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig};
use serde_json::json;
use tokenizers::{
    AddedToken, Tokenizer, TokenizerImpl,
    decoders::{DecoderWrapper, byte_level::ByteLevel as ByteLevelDecoder},
    models::bpe::{BPE, BpeTrainerBuilder},
    normalizers::NormalizerWrapper,
    pre_tokenizers::{PreTokenizerWrapper, byte_level::ByteLevel},
    processors::PostProcessorWrapper,
};

pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// 4 layers × 256 wide: a short completion takes tens of milliseconds on one core.
    Tiny,
    /// 8 layers × 512 wide.
    Small,
}

/// Text the tokenizer is trained on: this project's own documentation.
const CORPUS: &[&str] = &[
    include_str!("../../README.md"),
    include_str!("../../schema/src/lib.rs"),
    include_str!("../../hint-server/src/control/pid.rs"),
];

pub fn init(size: Size, out: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (hidden, inter, layers, heads, vocab, max_pos) = match size {
        Size::Tiny => (256, 704, 4, 4, 2048, 4096),
        Size::Small => (512, 1408, 8, 8, 4096, 8192),
    };
    let tokenizer = train_tokenizer(vocab)?;
    let tok_path = out.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| anyhow::anyhow!("saving the tokenizer: {e}"))?;
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("reloading the tokenizer: {e}"))?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .with_context(|| format!("tokenizer lacks {t}"))
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_pos,
        "bos_token_id": id(BOS)?,
        "eos_token_id": id(EOS)?,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "tokenflow_note": "random weights written by `tokenflow-backend init-model`"
    });
    std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let cfg: LlamaConfig = serde_json::from_value(config)?;
    let cfg = cfg.into_config(false);
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    Llama::load(vb, &cfg).context("building the model")?;
    // candle's CPU generator cannot be seeded: redraw every weight from a seeded generator with
    // the scale candle's initialiser gave it (norm weights, all ones, stay as they are).
    let mut rng = fastrand::Rng::with_seed(seed);
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("weights lock poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let v: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let n = v.len().max(1) as f32;
        let mean = v.iter().sum::<f32>() / n;
        let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
        if std == 0.0 {
            continue;
        }
        let half = std * 3f32.sqrt();
        let fresh: Vec<f32> = (0..v.len())
            .map(|_| mean + (rng.f32() * 2.0 - 1.0) * half)
            .collect();
        var.set(&Tensor::from_vec(fresh, var.as_tensor().shape(), &device)?)?;
    }
    drop(data);
    varmap
        .save(out.join("model.safetensors"))
        .context("writing model.safetensors")?;
    Ok(())
}

fn train_tokenizer(vocab: usize) -> Result<Tokenizer> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![
            AddedToken::from(BOS, true),
            AddedToken::from(EOS, true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut t: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    t.train(
        &mut trainer,
        CORPUS.iter().flat_map(|d| d.lines()).map(str::to_string),
    )
    .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    Ok(Tokenizer::from(t))
}

/// A loaded model folder.
pub struct Model {
    pub llama: Llama,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub device: Device,
    pub eos: u32,
    pub bos: Option<u32>,
    pub name: String,
}

impl Model {
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !dir.join(f).exists() {
                bail!(
                    "{} has no {f}: point --model at a folder with config.json, *.safetensors and tokenizer.json, or create one with `tokenflow-backend init-model --out {}`",
                    dir.display(),
                    dir.display()
                );
            }
        }
        let cfg: LlamaConfig = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .context("config.json is not a Llama config")?;
        let config = cfg.into_config(false);
        let mut weights: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        weights.sort();
        // SAFETY: the files are memory-mapped read-only and not modified while the server runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &device)? };
        let llama = Llama::load(vb, &config).context("loading the weights")?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
        let eos = tokenizer
            .token_to_id(EOS)
            .context("the tokenizer has no </s>")?;
        let bos = tokenizer.token_to_id(BOS);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            llama,
            config,
            tokenizer,
            device,
            eos,
            bos,
            name,
        })
    }

    pub fn new_cache(&self) -> Result<Cache> {
        Ok(Cache::new(true, DType::F32, &self.config, &self.device)?)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Logits of the next token after `ids` (fed from position `pos` on).
    pub fn forward(&self, ids: &[u32], pos: usize, cache: &mut Cache) -> Result<Tensor> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self.llama.forward(&input, pos, cache)?.squeeze(0)?)
    }

    pub fn max_len(&self) -> usize {
        self.config.max_position_embeddings
    }
}
