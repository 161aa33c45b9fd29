// Live checks against a real `gllm serve`, started (and restarted) with RuntimeProcess. The model is given by
// the caller with the greedy tokens and logprobs it must produce for --prompt-tokens (tests/test_bindings.py
// takes them from the engine itself).
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Linq;
using System.Threading;
using System.Threading.Tasks;

namespace Gllm.Tests
{
    public sealed partial class RuntimeTests : IDisposable
    {
        const double StartSeconds = 180, WaitSeconds = 60;
        readonly string python, model, endpoint, deadEndpoint, adapter;
        readonly int[] promptTokens, expectTokens, expectAdapterTokens;
        readonly double[] expectLogprobs;
        readonly int mainThread = Thread.CurrentThread.ManagedThreadId;
        RuntimeProcess runtime;
        LlmClient client;  // raises its events from Poll(), as a custom game loop would

        public RuntimeTests(Dictionary<string, string> args)
        {
            python = args["python"];
            model = args["model"];
            endpoint = "tcp://127.0.0.1:" + args["port"];
            deadEndpoint = "tcp://127.0.0.1:" + args["dead-port"];
            promptTokens = Program.Ints(args["prompt-tokens"]);
            expectTokens = Program.Ints(args["expect-tokens"]);
            expectLogprobs = Program.Doubles(args["expect-logprobs"]);
            adapter = args["adapter"];  // a LoRA adapter folder, served as "npc"
            expectAdapterTokens = Program.Ints(args["expect-adapter-tokens"]);
        }

        public void AddSteps(List<KeyValuePair<string, Action>> steps)
        {
            steps.Add(Step("a request fails with 'timeout' when no runtime listens", NoRuntime));
            steps.Add(Step("RuntimeProcess starts gllm serve and waits for a pong", StartRuntime));
            steps.Add(Step("connect, ping and info", ConnectPingInfo));
            steps.Add(Step("greedy stream equals the engine's tokens (events on the context's thread)", GreedyOnContext));
            steps.Add(Step("score matches the greedy tokens' logprobs", Score));
            steps.Add(Step("a LoRA adapter per request: info lists it, generate and score use it", Adapter));
            steps.Add(Step("cancel mid-stream", CancelMidStream));
            steps.Add(Step("error replies for bad requests", Errors));
            steps.Add(Step("structured output: a JSON schema, choices, a tool call, a refused schema", Structured));
            steps.Add(Step("snapshot, restore pinned, release; a saved conversation's bytes", SavedStates));
            steps.Add(Step("inject mid-line, and the game-state generate options", InjectAndOptions));
            steps.Add(Step("an idle connection outlives the runtime's heartbeat timeout (PING answered)", IdleConnection));
            steps.Add(Step("a frozen runtime is detected by heartbeats, and the client reconnects", FrozenRuntime));
            steps.Add(Step("reconnect after the runtime restarts", Restart));
            steps.Add(Step("Dispose returns at once and fails open requests", DisposeFast));
        }

        static KeyValuePair<string, Action> Step(string name, Action action) { return new KeyValuePair<string, Action>(name, action); }

        public string LastOutput() { return runtime == null ? "(not started)" : runtime.LastOutput(); }

        public void Dispose()
        {
            if (client != null) client.Dispose();
            if (runtime != null) runtime.Dispose();
        }

        // ----------------------------------------------------------------------------------- helpers
        /// <summary>Pumps until done() or the time is up, which is an error unless quietTimeout.</summary>
        static void PumpUntil(Func<bool> done, Action pump, double seconds, string what, bool quietTimeout = false)
        {
            var clock = Stopwatch.StartNew();
            while (!done())
            {
                if (clock.Elapsed.TotalSeconds > seconds)
                {
                    if (quietTimeout) return;
                    throw new TimeoutException("waited " + seconds + " s for " + what);
                }
                pump();
                Thread.Sleep(1);
            }
            pump();
        }

        void Wait(Task task, string what, LlmClient polled = null)
        {
            polled = polled ?? client;
            PumpUntil(() => task.IsCompleted, () => polled.Poll(), WaitSeconds, what);
        }

        T Result<T>(Task<T> task, string what, LlmClient polled = null)
        {
            Wait(task, what, polled);
            return task.Result;
        }

        RuntimeProcess Launch()
        {
            var process = RuntimeProcess.Start(python, "-m gllm " + RuntimeProcess.ServeArguments(endpoint, model) + " --adapter npc=" + adapter, endpoint);
            process.WaitReady(TimeSpan.FromSeconds(StartSeconds)).Wait();
            return process;
        }

        Generation Greedy(LlmClient c, int maxTokens, int logprobs = 0, string affinity = null)
        {
            return c.Generate(Prompt.Tokens(promptTokens), new GenerateOptions { MaxTokens = maxTokens, Temperature = 0, IgnoreEos = true, Logprobs = logprobs, Affinity = affinity });
        }

        void CheckGreedy(Generation g, string what)
        {
            int[] got = g.Tokens.Select(t => t.TokenId).ToArray();
            Check.That(got.SequenceEqual(expectTokens), what + ": tokens " + string.Join(",", got) + " vs engine " + string.Join(",", expectTokens));
            for (int i = 0; i < got.Length; i++)
            {
                Check.Equal(i, g.Tokens[i].Index, what + ": token index");
                Check.Close(expectLogprobs[i], g.Tokens[i].Logprob, 1e-3, what + ": logprob of token " + i);
            }
            Check.Equal("length", g.Result.FinishReason, what + ": finish reason");
            Check.Equal(expectTokens.Length, g.Result.Usage.CompletionTokens, what + ": completion tokens");
            Check.Equal(promptTokens.Length, g.Result.Usage.PromptTokens, what + ": prompt tokens");
            Check.Equal(g.TextSoFar, g.Text.Result, what + ": Text equals the streamed text");
        }

        // ------------------------------------------------------------------------------------- steps
        void NoRuntime()
        {
            var options = new LlmClientOptions { RequestTimeout = TimeSpan.FromSeconds(1) };
            using (var dead = new LlmClient(deadEndpoint, options, null))
            {
                Task connect = dead.Connect();
                Generation g = dead.Generate(Prompt.Tokens(promptTokens));
                // Only the 1 s request timeout ends these (their code says so); the bound is generous for slow machines.
                PumpUntil(() => g.IsDone && connect.IsCompleted, () => dead.Poll(), WaitSeconds, "the timeout");
                Check.Equal("timeout", g.Error.Code, "generation error code");
                Check.Equal("timeout", Check.Failure(g.Text, "Text").Code, "Text failure code");
                Check.Equal("timeout", Check.Failure(connect, "Connect").Code, "Connect failure code");
            }
            Check.Throws<ArgumentException>(() => new LlmClient("tcp://192.0.2.1:5555", null, null), "a non-loopback endpoint");
            Check.Throws<ArgumentException>(() => new LlmClient("127.0.0.1:5555", null, null), "an endpoint without tcp://");
        }

        void StartRuntime()
        {
            runtime = Launch();
        }

        void ConnectPingInfo()
        {
            client = new LlmClient(endpoint, new LlmClientOptions(), null);
            Check.That(client.NeedsPolling, "a client made without a context is polled");
            int connectedEvents = 0;
            client.Connected += () => connectedEvents++;
            Wait(client.Connect(), "Connect");
            Check.That(client.IsConnected && connectedEvents == 1, "Connected raised once");
            double ms = Result(client.Ping(), "Ping");
            Check.That(ms >= 0 && ms < 5000, "ping round trip " + ms + " ms");
            RuntimeInfo info = Result(client.Info(), "Info");
            Check.Equal(1, info.ProtocolVersion, "protocol version");
            Check.That(info.VocabSize > 0 && info.MaxSeqLen > promptTokens.Length, "vocab size and context from info");
            Check.That(info.Stats.ContainsKey("running"), "info carries live stats");
        }

        void GreedyOnContext()
        {
            var context = new PumpContext();
            using (var onContext = new LlmClient(endpoint, null, context))
            {
                Check.That(!onContext.NeedsPolling, "a client made with a context is not polled");
                Generation g = Greedy(onContext, expectTokens.Length, logprobs: 2, affinity: "npc-7");  // accepted, and no other effect here
                var threads = new HashSet<int>();
                int completed = 0;
                g.Token += t => threads.Add(Thread.CurrentThread.ManagedThreadId);
                g.Completed += c => { completed++; threads.Add(Thread.CurrentThread.ManagedThreadId); };
                PumpUntil(() => g.Text.IsCompleted, context.Pump, WaitSeconds, "the greedy generation");
                Check.Equal(1, completed, "Completed raised once");
                Check.That(threads.SetEquals(new[] { mainThread }), "events ran on the thread that pumps the context");
                CheckGreedy(g, "greedy");
                foreach (LlmToken t in g.Tokens)
                {
                    Check.Equal(1, t.Rank, "greedy tokens have rank 1");
                    Check.Equal(2, t.Top.Length, "two alternatives per token");
                    Check.Equal(t.TokenId, t.Top[0].TokenId, "the best alternative is the token");
                    Check.That(t.Top[0].Logprob >= t.Top[1].Logprob, "alternatives best first");
                }
            }
        }

        void Score()
        {
            int a = expectTokens[0], b = expectTokens[1], other = (expectTokens[0] + 1) % 256;
            ScoreResult r = Result(client.Score(Prompt.Tokens(promptTokens), new[] { new[] { a }, new[] { a, b }, new[] { other } }, affinity: "npc-7"), "Score");
            Check.Equal(3, r.Candidates.Length, "candidates");
            Check.Close(expectLogprobs[0], r.Candidates[0].Logprob, 1e-3, "score of the first greedy token");
            Check.Close(expectLogprobs[0] + expectLogprobs[1], r.Candidates[1].Logprob, 2e-3, "score of the first two");
            Check.That(r.Candidates[1].TokenIds.SequenceEqual(new[] { a, b }), "token ids echoed");
            Check.Close(r.Candidates[1].TokenLogprobs.Sum(), r.Candidates[1].Logprob, 1e-6, "logprob is the sum of token logprobs");
            Check.That(r.Candidates[2].Logprob <= r.Candidates[0].Logprob, "a greedy token scores at least as well as another");
            Check.Equal(0, r.Best, "Best");
        }

        void Adapter()
        {
            Check.That(Result(client.Info(), "Info").Adapters.SequenceEqual(new[] { "npc" }), "info lists the adapter");
            var options = new GenerateOptions { MaxTokens = expectAdapterTokens.Length, Temperature = 0, IgnoreEos = true, Adapter = "npc" };
            Generation g = client.Generate(Prompt.Tokens(promptTokens), options);
            Wait(g.Text, "adapter stream");
            int[] got = g.Tokens.Select(t => t.TokenId).ToArray();
            Check.That(got.SequenceEqual(expectAdapterTokens), "tokens under the adapter: " + string.Join(",", got));
            var candidates = new[] { new[] { expectTokens[0] } };
            double plain = Result(client.Score(Prompt.Tokens(promptTokens), candidates), "Score").Candidates[0].Logprob;
            double adapted = Result(client.Score(Prompt.Tokens(promptTokens), candidates, adapter: "npc"), "Score").Candidates[0].Logprob;
            Check.Close(expectLogprobs[0], plain, 1e-3, "score without the adapter");
            Check.That(Math.Abs(adapted - plain) > 1e-3, "the adapter changes the score: " + adapted + " vs " + plain);
            // A state saved under the adapter serves only requests under it.
            int[] chat = LongPrompt().Select(t => t + 3).ToArray();  // a prompt no other step caches
            SavedState saved = Result(client.Snapshot(Prompt.Tokens(chat), adapter: "npc"), "Snapshot under the adapter");
            Check.Equal(32, saved.Tokens, "tokens in the state saved under the adapter");
            Check.Equal(32, Result(client.Restore(saved.State), "Restore under the adapter").Tokens, "restored tokens");
            foreach (string name in new[] { null, "npc" })
            {
                Generation turn = client.Generate(Prompt.Tokens(chat), new GenerateOptions { MaxTokens = 1, Temperature = 0, Adapter = name });
                Wait(turn.Text, "a generation over the restored prefix");
                Check.Equal(name == null ? 0 : 32, turn.Result.Usage.CachedTokens, "cached tokens, adapter " + (name ?? "none"));
            }
        }

        void IdleConnection()
        {
            int disconnects = 0;
            Action<string> onDisconnect = reason => disconnects++;
            client.Disconnected += onDisconnect;
            PumpUntil(() => disconnects > 0, () => client.Poll(), 6, "nothing", quietTimeout: true);
            client.Disconnected -= onDisconnect;
            Check.Equal(0, disconnects, "disconnects while idle for 6 s (past the 5 s TTL the client's PINGs ask the runtime to keep)");
            Check.That(Result(client.Ping(), "Ping after idling") >= 0, "the runtime still answers");
        }

        void FrozenRuntime()
        {
            var options = new LlmClientOptions { HeartbeatInterval = TimeSpan.FromMilliseconds(300), HeartbeatTimeout = TimeSpan.FromSeconds(1.5) };
            using (var watcher = new LlmClient(endpoint, options, null))
            {
                int disconnects = 0, connects = 0;
                watcher.Disconnected += reason => disconnects++;
                watcher.Connected += () => connects++;
                Generation running = Greedy(watcher, 400);
                PumpUntil(() => running.Tokens.Count > 0, () => watcher.Poll(), WaitSeconds, "the first token");
                Signal("STOP");  // the process (libzmq's heartbeats included) stops, but its socket stays open
                try
                {
                    // Only the 1.5 s heartbeat timeout can notice a frozen runtime; the bound is generous for slow machines.
                    PumpUntil(() => running.IsDone && disconnects > 0, () => watcher.Poll(), WaitSeconds, "the heartbeat timeout");
                    Check.Equal("disconnected", running.Error.Code, "a stream of a frozen runtime fails with");
                }
                finally
                {
                    Signal("CONT");
                }
                PumpUntil(() => connects >= 2, () => watcher.Poll(), WaitSeconds, "the reconnect after the freeze");
                Check.That(Result(watcher.Ping(), "Ping after the freeze", watcher) >= 0, "the runtime answers again");
            }
        }

        void Signal(string name)
        {
            // The shell's own kill: no dependency on procps.
            var info = new ProcessStartInfo("sh", "-c \"kill -" + name + " " + runtime.Process.Id + "\"") { UseShellExecute = false };
            using (Process kill = Process.Start(info))
                kill.WaitForExit();
        }

        void Restart()
        {
            int disconnects = 0, connects = 0;
            client.Disconnected += reason => disconnects++;
            client.Connected += () => connects++;
            Generation running = Greedy(client, 400);
            PumpUntil(() => running.Tokens.Count > 0, () => client.Poll(), WaitSeconds, "the first token");
            runtime.Dispose();  // kill -9: no goodbye on the wire
            PumpUntil(() => running.IsDone && disconnects > 0, () => client.Poll(), WaitSeconds, "the disconnect");
            Check.Equal("disconnected", running.Error.Code, "a stream cut by the runtime's death fails with");
            Task<double> queued = client.Ping();  // made while down: waits for the next connection
            var impatientOptions = new LlmClientOptions { RequestTimeout = TimeSpan.FromSeconds(1) };
            using (var impatient = new LlmClient(endpoint, impatientOptions, null))
            {
                Generation lost = Greedy(impatient, expectTokens.Length);  // no runtime: times out instead of waiting
                PumpUntil(() => lost.IsDone, () => impatient.Poll(), WaitSeconds, "the timeout while the runtime is down");
                Check.Equal("timeout", lost.Error.Code, "a request made while the runtime is down fails with");
                runtime = Launch();
                Check.That(Result(queued, "the ping queued while disconnected") >= 0, "queued ping answered");
                Check.That(client.IsConnected && connects > 0, "reconnected by itself");
                Generation again = Greedy(client, expectTokens.Length);
                Wait(again.Text, "greedy after the restart");
                CheckGreedy(again, "greedy after the restart");
                PumpUntil(() => impatient.IsConnected, () => impatient.Poll(), WaitSeconds, "the timed-out client's reconnect");
                Generation retried = Greedy(impatient, expectTokens.Length);  // the same client, once the runtime is back
                Wait(retried.Text, "greedy on the timed-out client after the restart", impatient);
                CheckGreedy(retried, "greedy on the timed-out client after the restart");
                RuntimeInfo info = Result(client.Info(), "Info after the restart");
                Check.Equal(2L, Convert.ToInt64(info.Stats["finished_requests"]), "requests the restarted runtime ran (the timed-out one was never sent)");
            }
        }

        void DisposeFast()
        {
            Generation open = Greedy(client, 400);
            PumpUntil(() => open.Tokens.Count > 0, () => client.Poll(), WaitSeconds, "the first token");
            var clock = Stopwatch.StartNew();
            client.Dispose();
            // It waits for nothing on the wire: well under the time the open 400-token stream needs on any machine.
            Check.That(clock.ElapsedMilliseconds < 5000, "Dispose took " + clock.ElapsedMilliseconds + " ms");
            PumpUntil(() => open.IsDone, () => client.Poll(), WaitSeconds, "the open request's failure");
            Check.Equal("closed", open.Error.Code, "open request error after Dispose");
            Check.Throws<ObjectDisposedException>(() => client.Generate("x"), "Generate after Dispose");
        }
    }
}
