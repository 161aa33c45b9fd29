// Live checks against a real `gllm serve`, continued (RuntimeTests.cs): structured output, cancels, errors,
// saved states, injections and request options.
using System;
using System.Collections.Generic;
using System.Linq;
using System.Threading.Tasks;

namespace Gllm.Tests
{
    public sealed partial class RuntimeTests
    {
        void Structured()
        {
            var schema = new Dictionary<string, object>
            {
                { "type", "object" }, { "additionalProperties", false }, { "required", new List<object> { "say", "mood" } },
                { "properties", new Dictionary<string, object>
                    {
                        { "say", new Dictionary<string, object> { { "type", "string" }, { "maxLength", 10 } } },
                        { "mood", new Dictionary<string, object> { { "enum", new List<object> { "calm", "angry" } } } },
                    } },
            };
            Generation json = client.Generate(Prompt.Chat(ChatMessage.User("Hi")), new GenerateOptions { MaxTokens = 60, Temperature = 1.0, Seed = 7, JsonSchema = schema });
            string text = Result(json.Text, "the JSON reply");
            Check.Equal("stop", json.Result.FinishReason, "JSON reply finish reason");
            Check.Equal(true, json.Result.StructureComplete, "the structure is complete");
            var parsed = MiniJson.Parse(text) as Dictionary<string, object>;
            string say = parsed == null ? null : parsed["say"] as string;
            // maxLength counts code points; a C# string counts UTF-16 units (two for a character past U+FFFF).
            Check.That(parsed != null && parsed.Count == 2 && say != null && say.Length - say.Count(char.IsLowSurrogate) <= 10, "the reply follows the schema: " + text);
            Check.That((string)parsed["mood"] == "calm" || (string)parsed["mood"] == "angry", "mood from the enum: " + text);

            Generation pick = client.Generate("Open the gate?", new GenerateOptions { Choices = new[] { "yes", "no" }, Temperature = 1.0, Seed = 3 });
            string choice = Result(pick.Text, "the choice");
            Check.That(choice == "yes" || choice == "no", "one of the choices: " + choice);
            Check.That(pick.Result.ToolCalls.Length == 0, "no tool call without tools");

            var tools = new[]
            {
                new ToolSpec("sell", "Sell an item.", "{\"type\": \"object\", \"required\": [\"item\"], \"additionalProperties\": false, \"properties\": {\"item\": {\"enum\": [\"sword\", \"rope\"]}}}"),
                new ToolSpec("wave"),
            };
            Generation call = client.Generate(Prompt.Chat(ChatMessage.User("A rope, please.")), new GenerateOptions { MaxTokens = 80, Temperature = 1.0, Seed = 5, Tools = tools, ToolChoice = "sell" });
            Result(call.Text, "the tool call");
            Check.Equal(1, call.Result.ToolCalls.Length, "one tool call");
            ToolCall sell = call.Result.ToolCalls[0];
            Check.Equal("sell", sell.Name, "the named tool");
            string item = sell.Arguments["item"] as string;
            Check.That(item == "sword" || item == "rope", "arguments follow the schema: " + sell.ArgumentsJson);
            var again = MiniJson.Parse(sell.ArgumentsJson) as Dictionary<string, object>;
            Check.That(again != null && (string)again["item"] == item, "ArgumentsJson is the arguments as JSON: " + sell.ArgumentsJson);

            Generation bad = client.Generate("x", new GenerateOptions { JsonSchema = "{\"type\": \"nope\"}" });
            Wait(bad.Text.ContinueWith(_ => 0), "the refused schema");
            LlmError error = Check.Failure(bad.Text, "a schema that does not compile");
            Check.Equal("bad_request", error.Code, "error code");
        }

        void CancelMidStream()
        {
            Generation g = Greedy(client, 400);
            int tokens = 0;
            g.Token += t =>
            {
                if (++tokens == 3)
                {
                    g.Cancel();
                    g.Cancel();  // idempotent
                }
            };
            string text = Result(g.Text, "the cancelled generation");
            Check.Equal("cancelled", g.Result.FinishReason, "finish reason");
            Check.That(g.Tokens.Count >= 3 && g.Tokens.Count < 400, "stopped early, after " + g.Tokens.Count + " tokens");
            // After a cancel the runtime may add characters it held back (a possible stop string).
            Check.That(text.StartsWith(g.TextSoFar, StringComparison.Ordinal), "Text holds the partial text");
            g.Cancel();  // after the end: nothing happens
            Check.That(Result(client.Ping(), "Ping after cancel") >= 0, "the runtime still answers");
        }

        void Errors()
        {
            var bad = new Dictionary<string, GenerateOptions>
            {
                { "negative temperature", new GenerateOptions { Temperature = -1 } },
                { "top_p of 0", new GenerateOptions { TopP = 0 } },
                { "too many logprobs", new GenerateOptions { Logprobs = 50 } },
                { "an affinity key over 256 characters", new GenerateOptions { Affinity = new string('k', 257) } },
            };
            foreach (var kv in bad)
            {
                Generation g = client.Generate(Prompt.Tokens(promptTokens), kv.Value);
                LlmError failed = null;
                bool completed = false;
                g.Failed += e => failed = e;
                g.Completed += c => completed = true;
                Wait(g.Text, kv.Key);
                Check.Equal("bad_request", Check.Failure(g.Text, kv.Key).Code, kv.Key + ": error code");
                Check.That(failed != null && failed.Message.Length > 0 && !completed, kv.Key + ": Failed raised with a message, Completed not");
            }
            Task<ScoreResult> score = client.Score(Prompt.Tokens(promptTokens), new[] { new[] { -5 } });
            Wait(score, "a bad score");
            Check.Equal("bad_request", Check.Failure(score, "score with a negative token id").Code, "score error code");
            Check.That(Result(client.Ping(), "Ping after errors") >= 0, "the runtime still answers");
        }

        int[] LongPrompt()  // two whole blocks of 16 tokens, and a few more
        {
            return Enumerable.Range(0, 37).Select(i => promptTokens[i % promptTokens.Length] + i).ToArray();
        }

        long Stat(string name)
        {
            return Convert.ToInt64(Result(client.Info(), "Info").Stats[name]);
        }

        void SavedStates()
        {
            int[] chat = LongPrompt();
            SavedState saved = Result(client.Snapshot(Prompt.Tokens(chat)), "Snapshot");
            Check.Equal(32, saved.Tokens, "tokens in the state");
            RestoreResult restored = Result(client.Restore(saved.State, pin: true), "Restore");
            Check.That(restored.Pinned && restored.Tokens == 32, "restored 32 tokens, pinned");
            Check.Equal(2L, Stat("kv_blocks_pinned"), "pinned blocks");
            Generation g = client.Generate(Prompt.Tokens(chat), new GenerateOptions { MaxTokens = 2, Temperature = 0 });
            Wait(g.Text, "a generation over the restored prefix");
            Check.Equal(32, g.Result.Usage.CachedTokens, "cached tokens");
            client.Release(restored.Id);
            PumpUntil(() => Stat("kv_blocks_pinned") == 0, () => client.Poll(), WaitSeconds, "the release");
            Task<RestoreResult> garbage = client.Restore(new byte[] { 1, 2, 3 });
            Wait(garbage, "a garbage restore");
            Check.Equal("bad_request", Check.Failure(garbage, "restore of garbage").Code, "garbage state refused");
            var turns = new List<ChatMessage> { ChatMessage.System("You are Brom."), ChatMessage.User("Hi") };
            byte[] file = new ConversationState { Messages = turns, Kv = saved.State }.ToBytes();
            ConversationState back = ConversationState.FromBytes(file);
            Check.That(back.Kv.SequenceEqual(saved.State), "the KV state survives the save format");
            Check.Equal("Hi", back.Messages[1].Content, "the turns survive the save format");
            Check.Equal(32, Result(back.Load(client), "Load").Tokens, "a loaded conversation restores its KV");
            Check.Throws<ArgumentException>(() => ConversationState.FromBytes(saved.State), "a raw state is not a saved conversation");
        }

        void InjectAndOptions()
        {
            Generation g = Greedy(client, 30);
            g.Token += t => { if (t.Index == 2) g.Inject(new[] { 3, 1, 4 }); };
            Wait(g.Text, "the generation with an injection");
            LlmToken[] marked = g.Tokens.Where(t => t.Injected > 0).ToArray();
            Check.That(marked.Length == 1 && marked[0].Injected == 3 && marked[0].Index > 2, "one token marks the injection");
            Check.Equal(3, g.Result.Usage.InjectedTokens, "injected tokens in usage");
            Check.Equal(30, g.Result.Usage.CompletionTokens, "completion tokens");
            var options = new GenerateOptions { MaxTokens = 4, Temperature = 0.7, Seed = 5, Deterministic = true, MaxTokensPerSecond = 1000, DeadlineMs = 50 };
            Generation a = client.Generate(Prompt.Tokens(promptTokens), options);
            Generation b = client.Generate(Prompt.Tokens(promptTokens), options);
            Wait(a.Text, "a deterministic generation");
            Wait(b.Text, "its twin");
            Check.That(a.Tokens.Select(t => t.TokenId).SequenceEqual(b.Tokens.Select(t => t.TokenId)), "same seed, same tokens");
            Generation chat = client.Generate(Prompt.Tokens(promptTokens), new GenerateOptions { ContextOverflow = "drop_oldest" });
            Wait(chat.Text, "drop_oldest without messages");
            Check.Equal("bad_request", Check.Failure(chat.Text, "drop_oldest on token ids").Code, "drop_oldest needs messages");
        }
    }
}
