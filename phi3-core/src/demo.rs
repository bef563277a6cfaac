//! The built-in demo model: a small Phi-3 with deterministic random weights and a tokenizer built
//! in code, so `phi3 generate "Hello"` runs the whole pipeline (tokenize -> chat template ->
//! prefill -> decode -> streaming detokenize) on a fresh machine with no files or downloads.
//! Its output is gibberish made of English-looking pieces.
//!
//! The config is a scaled-down Phi-3-medium-128k: GQA (8 query heads share 4 KV heads), untied
//! embeddings, LongRoPE with `original_max_position_embeddings` = 64 so that an ordinary chat
//! crosses from short to long factors, and a vocabulary padded to a multiple of 64 past the
//! tokenizer's size (as Phi-3's 32064 rows vs 32011 ids), so the padding ids exist but are never
//! produced. Weights are [`loader::dummy`] in bf16 with [`DEMO_SEED`].
//!
//! The tokenizer is the same family as Phi-3's `tokenizer.json` (HF `tokenizers`: normalizer
//! `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer, BPE with byte fallback, decoder
//! `Replace`/`ByteFallback`/`Fuse`/`Strip`, `TemplateProcessing` adding `<s>`) with its own small
//! vocabulary: `<unk>` `<s>` `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>`, the printable ASCII
//! characters and `▁`, and merges for the English words and subwords of `WORDS`; then the
//! special tokens `<|endoftext|>`, `<|assistant|>`, `<|system|>`, `<|end|>`, `<|user|>`. Its
//! `tokenizer_config.json` names `LlamaTokenizer` like Phi-3's, so it loads through the same
//! transformers-5 pipeline as the real model, and carries a Phi-3-medium-style chat template that
//! renders system messages.
//!
//! Invariants: every function here is a pure function of the source (same bytes on every call and
//! machine); every piece of the vocabulary is reachable by the merges, and every word of
//! `WORDS` encodes to a single token.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::loader::{self, DType};
use crate::model::{DummyWeights, LoadOptions, Model};
use crate::tokenizer::Tokenizer;

/// Seed of the demo model's random weights. Chosen among 0..300: greedy replies to "Hello" (raw
/// and as a chat) run 40 tokens without an end token, with over 30 distinct tokens and the
/// fewest byte-fallback pieces (see `tests::greedy_output_varies`).
pub const DEMO_SEED: u64 = 36;

const HIDDEN_SIZE: usize = 256;
const INTERMEDIATE_SIZE: usize = 512;
const NUM_LAYERS: usize = 4;
const NUM_HEADS: usize = 8;
const NUM_KV_HEADS: usize = 4;
const HEAD_DIM: usize = HIDDEN_SIZE / NUM_HEADS;
/// LongRoPE switches from short to long factors past this many tokens.
const ORIGINAL_MAX_POSITIONS: usize = 64;
const MAX_POSITIONS: usize = 4096;
const ROPE_THETA: f64 = 10_000.0;
/// The embedding table has a multiple of this many rows (Phi-3: 32064 = 501 * 64).
const VOCAB_PADDING: usize = 64;

/// SentencePiece's word-boundary mark, which the normalizer puts in place of spaces.
const SPACE: char = '▁';

/// The added special tokens, in id order after the vocabulary, with Phi-3's `rstrip` flags.
const SPECIAL_TOKENS: [(&str, bool); 5] = [
    ("<|endoftext|>", false),
    ("<|assistant|>", true),
    ("<|system|>", true),
    ("<|end|>", true),
    ("<|user|>", true),
];
/// Indices into [`SPECIAL_TOKENS`].
const ENDOFTEXT: usize = 0;
const END: usize = 3;

/// Phi-3-medium's chat format, extended to render every message's role (so system messages too).
const CHAT_TEMPLATE: &str = concat!(
    r"{{ bos_token }}{% for message in messages %}",
    r"{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n'}}",
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
);

/// The pieces the merges build, in merge-priority order. A leading `-` marks a piece used inside
/// words; every other entry is a word and gets the word-boundary mark (`the` -> `▁the`). Common
/// subwords come first so that words are assembled from them, as SentencePiece's BPE does.
const WORDS: &str = "
-er -in -on -re -at -en -an -or -es -ed -th -st -ar -al -le -it -is -ou -ing -ion -tion -ly
-ve -nd -ent -ers -ic -as -ro -de -ch -ll -us -ad -ur -ow -ter -ity -ment -ness -able -ful
-less -ous -ive -ize -ist -ated -ance -ence -est -un -pro -con -com -dis -'s -n't -Hello -Hi
the of and to a in is that for it as was with be by on not he I this are or his from at which
but have an they you were her she there one all we their been has when who will more no if out
so said what up its about into than them can only other new some could time these two may then
do first any my now such like our over man me even most made after also did many before must
through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go
came right used take three himself few house use during without again place around however home
small found thought went say part once general high upon school every does got left number
course war until always away something fact though water less public put think almost hand
enough far took head yet government system better set told nothing night end why called eyes
find going look asked later knew point next program city business give group toward young days
let room side social given present several order national possible rather second face per among
form important often things looked early white case become large big need four within felt
along children saw best ever least power development light thing seemed family interest want
members mind country area others done turned although open service certain kind problem began
different door thus help sense means whole matter perhaps itself times law human line above name
example action company hands local show whether five history gave today either act feet across
taken past quite anything seen having death experience body word half really week field car
words already information tell together shall money period held keep sure free real probably
seems behind cannot question air office making brought whose special heard major ago became
moment study known result street boy position reason change south board job society west close
turn love community true court force full seem am policy future age voice center woman control
common necessary following front sometimes six girl clear further land run students provide
feel party able mother music education child effect level stood town short morning total
outside rate figure class art century north usually plan leave therefore evidence top million
sound black strong hard various says believe type value play surface soon mean near lines table
peace modern road red book personal process situation minutes increase idea alone women gone
nor story language garden river sea tree sun moon bright dark happy quiet friend dream green
blue fast slow hello model token The It In This We You He She They What How There A When If
Hello Mr Mrs
";

/// The demo tokenizer's vocabulary and merges, built from [`WORDS`].
struct Vocab {
    /// Every piece of the BPE model, index = id: `<unk>`, `<s>`, `</s>`, bytes, characters, merges.
    pieces: Vec<String>,
    ids: HashMap<String, u32>,
    /// In priority order.
    merges: Vec<(String, String)>,
    ranks: HashMap<(String, String), usize>,
}

impl Vocab {
    fn build() -> Vocab {
        let mut v = Vocab {
            pieces: Vec::new(),
            ids: HashMap::new(),
            merges: Vec::new(),
            ranks: HashMap::new(),
        };
        for piece in ["<unk>", "<s>", "</s>"] {
            v.push_piece(piece.to_string());
        }
        for b in 0..=255u8 {
            v.push_piece(format!("<0x{b:02X}>"));
        }
        v.push_piece(SPACE.to_string());
        for c in '!'..='~' {
            v.push_piece(c.to_string());
        }
        for entry in WORDS.split_whitespace() {
            match entry.strip_prefix('-') {
                Some(subword) => v.add_word(subword.to_string()),
                None => v.add_word(format!("{SPACE}{entry}")),
            }
        }
        v
    }

    fn push_piece(&mut self, piece: String) {
        if !self.ids.contains_key(&piece) {
            self.ids.insert(piece.clone(), self.pieces.len() as u32);
            self.pieces.push(piece);
        }
    }

    /// Make `word` one token: split it with the merges so far, then join the parts left to
    /// right with new merges (each new merge ranks after all others, so BPE reproduces this).
    fn add_word(&mut self, word: String) {
        if self.ids.contains_key(&word) {
            return;
        }
        let parts = self.segment(&word);
        let Some((first, rest)) = parts.split_first() else { return };
        let mut joined = first.clone();
        for part in rest {
            let pair = (joined.clone(), part.clone());
            joined.push_str(part);
            self.push_piece(joined.clone());
            if !self.ranks.contains_key(&pair) {
                self.ranks.insert(pair.clone(), self.merges.len());
                self.merges.push(pair);
            }
        }
    }

    /// BPE: start from characters and apply the best-ranked merge until none applies.
    fn segment(&self, word: &str) -> Vec<String> {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&rank| (rank, i))
                })
                .min();
            let Some((_, i)) = best else { return parts };
            let right = parts.remove(i + 1);
            parts[i].push_str(&right);
        }
    }

    /// Number of ids including the added special tokens (the tokenizer's `vocab_size`).
    fn tokenizer_size(&self) -> usize {
        self.pieces.len() + SPECIAL_TOKENS.len()
    }

    /// Id of `SPECIAL_TOKENS[index]`.
    fn special_id(&self, index: usize) -> u32 {
        (self.pieces.len() + index) as u32
    }
}

/// The demo model's config.json text.
pub fn demo_config_json() -> String {
    let vocab = Vocab::build();
    let vocab_size = vocab.tokenizer_size().div_ceil(VOCAB_PADDING) * VOCAB_PADDING;
    let (short_factor, long_factor) = longrope_factors();
    let config = json!({
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": ROPE_THETA,
        "rope_scaling": {
            "type": "longrope", "short_factor": short_factor, "long_factor": long_factor
        },
        "attention_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": [vocab.special_id(ENDOFTEXT), vocab.special_id(END)],
        "pad_token_id": vocab.special_id(ENDOFTEXT),
        "torch_dtype": "bfloat16",
    });
    pretty(&config)
}

/// Short factors near 1, long factors rising from 1 to the context extension (4096 / 64) over
/// the frequencies, the shape of Phi-3-128k's. Rounded so the JSON reads cleanly.
fn longrope_factors() -> (Vec<f64>, Vec<f64>) {
    let n = HEAD_DIM / 2;
    let scale = (MAX_POSITIONS / ORIGINAL_MAX_POSITIONS) as f64;
    let round = |x: f64| (x * 1e4).round() / 1e4;
    let t = |i: usize| i as f64 / (n - 1) as f64;
    let short = (0..n).map(|i| round(1.0 + 0.05 * t(i))).collect();
    let long = (0..n).map(|i| round(1.0 + (scale - 1.0) * t(i) * t(i))).collect();
    (short, long)
}

/// The demo tokenizer's `tokenizer.json` and `tokenizer_config.json`.
pub fn demo_tokenizer_files() -> (Vec<u8>, Vec<u8>) {
    let vocab = Vocab::build();
    let added = |id: usize, content: &str, special: bool, rstrip: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": rstrip, "normalized": false, "special": special})
    };
    let mut added_tokens = vec![
        added(0, "<unk>", true, false),
        added(1, "<s>", true, false),
        added(2, "</s>", false, true),
    ];
    for (i, (token, rstrip)) in SPECIAL_TOKENS.iter().enumerate() {
        added_tokens.push(added(vocab.pieces.len() + i, token, true, *rstrip));
    }
    let model_vocab: serde_json::Map<String, Value> =
        vocab.pieces.iter().enumerate().map(|(id, p)| (p.clone(), json!(id))).collect();
    let bos = |type_id: u32| json!({"SpecialToken": {"id": "<s>", "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let merges: Vec<Value> = vocab.merges.iter().map(|(a, b)| json!([a, b])).collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos(0), seq("A", 0)],
            "pair": [bos(0), seq("A", 0), bos(1), seq("B", 1)],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": model_vocab, "merges": merges},
    });
    let tokenizer_config = json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": SPECIAL_TOKENS[ENDOFTEXT].0,
        "pad_token": SPECIAL_TOKENS[ENDOFTEXT].0,
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "legacy": false,
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "LlamaTokenizer",
    });
    (pretty(&tokenizer).into_bytes(), pretty(&tokenizer_config).into_bytes())
}

fn pretty(v: &Value) -> String {
    // Serialising a `Value` cannot fail (all keys are strings).
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The demo model: [`demo_config_json`], random bf16 weights from [`DEMO_SEED`] and the demo
/// tokenizer. `options.dummy_weights`, when set, picks another dtype and seed. Loads in a few
/// milliseconds; nothing is read from disk.
///
/// Errors: those of [`Model::from_parts`] for `options`: `Unsupported` for a CUDA device on a
/// machine without one, `InvalidArgument` for `max_context = Some(0)` or a `prefill_chunk` out
/// of range.
pub fn demo_model(options: &LoadOptions) -> Result<Model> {
    let config = ModelConfig::from_json(&demo_config_json())?;
    let DummyWeights { dtype, seed } =
        options.dummy_weights.unwrap_or(DummyWeights { dtype: DType::BF16, seed: DEMO_SEED });
    let weights = loader::dummy(&config, dtype, seed)?;
    let (tokenizer_json, tokenizer_config) = demo_tokenizer_files();
    let tokenizer = Tokenizer::from_bytes(&tokenizer_json, Some(&tokenizer_config))?;
    Model::from_parts(config, &weights, Some(tokenizer), options, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatMessage, ChatTemplate};
    use crate::detok::IncrementalDecoder;
    use crate::sampler;

    fn tokenizer() -> Tokenizer {
        let (json, config) = demo_tokenizer_files();
        Tokenizer::from_bytes(&json, Some(&config)).unwrap()
    }

    fn model() -> Model {
        demo_model(&LoadOptions::default()).unwrap()
    }

    /// Greedy continuation of `prompt` (ids) for `steps` tokens, not stopping at EOS.
    fn greedy(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
        let mut session = model.session(Default::default()).unwrap();
        let mut logits = session.append_tokens(prompt).unwrap();
        let mut out = Vec::new();
        for _ in 0..steps {
            let id = sampler::greedy(&logits, model.emittable_vocab()).unwrap();
            out.push(id);
            logits = session.append_tokens(&[id]).unwrap();
        }
        out
    }

    fn hello_prompt(model: &Model) -> Vec<u32> {
        model.apply_chat_template(&[ChatMessage::new("user", "Hello")], true).unwrap()
    }

    #[test]
    fn files_are_deterministic() {
        assert_eq!(demo_tokenizer_files(), demo_tokenizer_files());
        assert_eq!(demo_config_json(), demo_config_json());
        // tokenizer.json also loads on its own (as the `tokenizers` library reads it).
        Tokenizer::from_bytes(&demo_tokenizer_files().0, None).unwrap();
    }

    #[test]
    fn tokenizer_round_trips() {
        let t = tokenizer();
        let texts = [
            "Hello world",
            "The quick brown fox jumps over the lazy dog. It's 42!",
            "x = f(a, b) + [1, 2]; // {ok} ~ @#$%^&*_|\\`<>?",
            "two  spaces,\ttab\nnewline\n\nand a trailing newline\n",
            "Emoji 🦀🙂 and accents: ünïcödé, 日本語",
        ];
        for text in texts {
            let ids = t.encode(text, false).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
            let with_bos = t.encode(text, true).unwrap();
            assert_eq!(with_bos[0], 1);
            assert_eq!(&with_bos[1..], &ids[..]);
            assert_eq!(t.decode(&with_bos, true).unwrap(), text);
        }
        // Emoji fall back to their UTF-8 bytes.
        let ids = t.encode("🦀", false).unwrap();
        let byte_ids: Vec<u32> = [0xF0u32, 0x9F, 0xA6, 0x80].iter().map(|b| 3 + b).collect();
        assert!(ids.ends_with(&byte_ids), "{ids:?}");
        assert!(ids.iter().all(|&id| id == t.token_to_id("▁").unwrap() || t.is_byte_token(id)));
    }

    #[test]
    fn words_are_single_tokens() {
        let t = tokenizer();
        for word in WORDS.split_whitespace().filter(|w| !w.starts_with('-')) {
            let ids = t.encode(word, false).unwrap();
            assert_eq!(ids.len(), 1, "{word}: {ids:?}");
            assert_eq!(t.id_to_token(ids[0]), Some(format!("▁{word}")));
        }
        let ids = t.encode("the people of the world", false).unwrap();
        assert_eq!(ids.len(), 5);
        // A word not in the list is built from subwords.
        let ids = t.encode("thinking", false).unwrap();
        assert!(ids.len() < "thinking".len(), "{ids:?}");
    }

    #[test]
    fn special_tokens_are_single_ids() {
        let t = tokenizer();
        let vocab = Vocab::build();
        assert_eq!(t.vocab_size(), vocab.tokenizer_size());
        for (i, (token, _)) in SPECIAL_TOKENS.iter().enumerate() {
            let id = vocab.special_id(i);
            assert_eq!(t.encode(token, false).unwrap(), vec![id], "{token}");
            assert_eq!(t.token_to_id(token), Some(id));
            assert!(t.is_special(id));
        }
        assert_eq!(t.encode("<s>", false).unwrap(), vec![1]);
        assert_eq!((t.bos_token(), t.bos_token_id()), (Some("<s>"), Some(1)));
        assert_eq!(t.eos_token(), Some("<|endoftext|>"));
        assert_eq!(t.eos_token_id(), Some(vocab.special_id(ENDOFTEXT)));
        assert!(t.is_special(0) && t.is_special(1) && !t.is_special(2));
        assert!(t.is_byte_token(3) && t.is_byte_token(258) && !t.is_byte_token(259));
    }

    #[test]
    fn chat_template_renders_and_encodes() {
        let t = tokenizer();
        let template = ChatTemplate::from_tokenizer(&t).unwrap();
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hello")];
        let text = template.render(&messages, true, "<s>", "<|endoftext|>").unwrap();
        assert_eq!(
            text,
            "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n"
        );
        let ids = t.encode(&text, false).unwrap();
        let id = |s: &str| t.token_to_id(s).unwrap();
        assert_eq!(&ids[..2], &[1, id("<|system|>")]);
        assert_eq!(ids.last(), Some(&id("<|assistant|>")));
        assert_eq!(ids.iter().filter(|&&i| i == id("<|end|>")).count(), 2);
        assert!(ids.contains(&id("<|user|>")));
        // rstrip on the role tokens eats the newline after them, as in Phi-3.
        assert_eq!(t.decode(&ids, true).unwrap(), "Be brief.Hello");
    }

    #[test]
    fn config_matches_tokenizer() {
        let config = ModelConfig::from_json(&demo_config_json()).unwrap();
        let t = tokenizer();
        assert_eq!(config.vocab_size % VOCAB_PADDING, 0);
        assert!(config.vocab_size > t.vocab_size());
        assert!(config.vocab_size - t.vocab_size() < VOCAB_PADDING);
        let eos: Vec<u32> =
            ["<|endoftext|>", "<|end|>"].iter().map(|s| t.token_to_id(s).unwrap()).collect();
        assert_eq!(config.eos_token_ids, eos);
        assert_eq!((config.num_attention_heads, config.num_key_value_heads), (8, 4));
        assert!(matches!(
            config.rope.scaling,
            crate::config::RopeScaling::LongRope { original_max_position_embeddings: 64, .. }
        ));
    }

    #[test]
    fn model_loads_with_padding_rows() {
        let model = model();
        let config = model.config();
        assert_eq!(model.emittable_vocab(), model.tokenizer().unwrap().vocab_size());
        assert!(model.emittable_vocab() < config.vocab_size);
        assert_eq!(model.max_context(), MAX_POSITIONS);
    }

    #[test]
    fn greedy_output_varies() {
        let model = model();
        let t = model.tokenizer().unwrap();
        let raw = t.encode("Hello", true).unwrap();
        for prompt in [raw, hello_prompt(&model)] {
            let out = greedy(&model, &prompt, 40);
            let mut distinct = out.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(distinct.len() > 3, "{out:?}");
            assert!(!model.config().eos_token_ids.contains(&out[0]), "{out:?}");
            assert!(out.iter().all(|&id| (id as usize) < model.emittable_vocab()));
            let text = t.decode(&out, false).unwrap();
            // Streaming detokenization gives the same text.
            let mut stream = IncrementalDecoder::new(t.clone(), false);
            let mut streamed: String = out.iter().map(|&id| stream.push(id).unwrap()).collect();
            streamed.push_str(&stream.flush());
            assert_eq!(streamed, text);
        }
    }

    #[test]
    fn same_seed_same_output() {
        let a = model();
        let b = model();
        let prompt = hello_prompt(&a);
        assert_eq!(greedy(&a, &prompt, 12), greedy(&b, &prompt, 12));
        let other = demo_model(&LoadOptions {
            dummy_weights: Some(DummyWeights { dtype: DType::BF16, seed: DEMO_SEED + 1 }),
            ..Default::default()
        })
        .unwrap();
        assert_ne!(greedy(&a, &prompt, 12), greedy(&other, &prompt, 12));
    }

    /// The path of `phi3 generate "Hello"`: chat message, greedy generate, streamed text.
    #[test]
    fn session_generate_streams_the_greedy_reply() {
        let model = model();
        let mut session = model.session(Default::default()).unwrap();
        session.append_message("user", "Hello").unwrap();
        // The assistant prompt is added when generation starts.
        let prompt = hello_prompt(&model);
        assert_eq!(session.tokens(), &prompt[..prompt.len() - 1]);
        let options = crate::GenerateOptions { max_tokens: 40, ..Default::default() };
        let mut streamed = String::new();
        let result = session
            .generate(&options, |text, _| {
                streamed.push_str(text);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(result.finish_reason, crate::FinishReason::Length);
        assert_eq!(result.tokens, greedy(&model, &hello_prompt(&model), 40));
        assert_eq!(streamed, result.text);
        assert!(result.text.split_whitespace().count() > 10, "{:?}", result.text);
    }

    #[test]
    fn chat_crosses_longrope_threshold() {
        let model = model();
        let prompt = hello_prompt(&model);
        assert!(prompt.len() < ORIGINAL_MAX_POSITIONS);
        let out = greedy(&model, &prompt, ORIGINAL_MAX_POSITIONS + 8 - prompt.len());
        assert!(prompt.len() + out.len() > ORIGINAL_MAX_POSITIONS);
        model.tokenizer().unwrap().decode(&out, false).unwrap();
    }
}
